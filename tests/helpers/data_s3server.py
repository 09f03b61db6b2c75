"""Test helpers: a moto S3 server on 127.0.0.1 and a TCP proxy that can simulate a restart.

The proxy sits between boto3 and moto. ``cut_after`` bytes of responses into the run, it drops
every open connection, refuses new ones for ``outage_s`` seconds and restarts the moto server,
i.e. what clients see when an S3-compatible server restarts mid-download.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto in server mode, in its own process (so forked DataLoader workers never inherit its
    listening socket). ``restart()`` kills and restarts it on the same port and puts back the
    objects written through this helper, like a real server whose storage outlives a restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.objects: dict[tuple[str, str], bytes] = {}
        self.buckets: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def _start(self) -> None:
        exe = shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto_server exited at start")
                time.sleep(0.05)
        else:
            raise RuntimeError("moto_server did not start")
        c = self.client()
        for b in self.buckets:
            c.create_bucket(Bucket=b)
        for (b, k), data in self.objects.items():
            c.put_object(Bucket=b, Key=k, Body=data)

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)
        self.buckets.append(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        self.objects[(bucket, key)] = data

    def restart(self) -> None:
        self.stop()
        self._start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to the moto server; can cut everything once mid-stream."""

    def __init__(self, moto: MotoS3, cut_after: int | None = None, outage_s: float = 1.0):
        self.moto = moto
        self.cut_after = cut_after
        self.outage_s = outage_s
        self.forwarded = 0
        self.outages = 0
        self.requests: list[bytes] = []
        self._down_until = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.close()  # "connection refused/reset" while the server restarts
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.moto.port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if not from_server:
                    self.requests.append(data[:400])
                if from_server and self.cut_after is not None:
                    with self._lock:
                        self.forwarded += len(data)
                        trigger = self.forwarded >= self.cut_after and self.outages == 0
                    if trigger:
                        dst.sendall(data[: len(data) // 2])
                        self._outage()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _outage(self) -> None:
        with self._lock:
            self.outages += 1
            self._down_until = time.monotonic() + self.outage_s
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        # stay "down" until the restarted server holds its objects again (a real server's
        # storage survives a restart; moto's memory does not, the helper puts it back)
        self._down_until = float("inf")
        started = time.monotonic()
        self.moto.restart()
        self._down_until = started + self.outage_s

    def close(self) -> None:
        self._stop = True
        self._listener.close()
