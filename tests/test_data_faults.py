"""Faults of the data layer (issue 13, classes 4 and 6): every PIL image mode decodes to the right
RGB values, oversized images are refused from their header, malformed tar headers cost only their
shard, shard faults are logged when they happen, and the data summary adds up."""
import io
import logging
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.data import DataConfig, DataError, build_pipeline
from core.data.images import ImageTooLarge, load_to_bucket, probe_size
from core.data.tario import TarMalformed, iter_samples
from tools.photo_shards import make_sample, write_tar

pytestmark = pytest.mark.usefixtures("one_thread")

S = 32  # test images are S x S and decoded to an S x S bucket: no resize, exact pixel values


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_raw(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A PNG of identical rows written by hand (PIL cannot write 16-bit RGB or a 1-bit PNG this
    large without holding it): filter byte 0 + ``row`` per line, compressed in pieces."""
    z = zlib.compressobj(9)
    line = b"\0" + row
    chunk = line * max(1, (1 << 20) // len(line))
    rows_per_chunk = len(chunk) // len(line)
    parts, left = [], height
    while left > 0:
        n = min(left, rows_per_chunk)
        parts.append(z.compress(chunk[:n * len(line)]))
        left -= n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def _decode(data: bytes) -> np.ndarray:
    """(S, S, 3) float RGB in [0, 1], as the pipeline makes it."""
    arr = load_to_bucket(data, (S, S), "center", np.random.default_rng(0))
    return arr.transpose(1, 2, 0).astype(np.float32) / 255.0


def _palette_image(transparent: bool) -> bytes:
    im = Image.new("P", (S, S), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.paste(1, (S // 2, 0, S, S))  # right half: index 1 (blue, or transparent)
    return _encode(im, "PNG", **({"transparency": 1} if transparent else {}))


def _split(left, right):
    """Expected image: ``left`` RGB on the left half, ``right`` on the right half."""
    out = np.empty((S, S, 3), np.float32)
    out[:, :S // 2], out[:, S // 2:] = np.array(left) / 255.0, np.array(right) / 255.0
    return out


def _uniform(rgb):
    return np.broadcast_to(np.array(rgb, np.float32) / 255.0, (S, S, 3))


# mode -> (encoded image, expected RGB float image, tolerance)
CASES = {
    # 16-bit grey mid-grey: scaled (32768/65535 = 0.5), not clipped to white
    "I;16 png": (lambda: _encode(Image.new("I;16", (S, S), 32768), "PNG"), _uniform((127.5,) * 3), 1 / 255),
    "I;16 png white/black": (
        lambda: _encode(Image.fromarray(np.tile(np.array([0, 65535], np.uint16).repeat(S // 2), (S, 1))), "PNG"),
        _split((0, 0, 0), (255, 255, 255)), 0.0),
    "I;16B tiff": (lambda: _encode(Image.new("I;16B", (S, S), 16384), "TIFF"), _uniform((63.75,) * 3), 1 / 255),
    "I tiff": (lambda: _encode(Image.new("I", (S, S), 49152), "TIFF"), _uniform((191.25,) * 3), 1 / 255),
    "16-bit RGB png": (lambda: _png_raw(S, S, 16, 2, struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF) * S),
                       _uniform((127.5, 63.75, 255)), 1 / 255),
    "F tiff": (lambda: _encode(Image.new("F", (S, S), 0.25), "TIFF"), _uniform((63.75,) * 3), 1 / 255),
    "L png": (lambda: _encode(Image.new("L", (S, S), 77), "PNG"), _uniform((77,) * 3), 0.0),
    "1-bit png": (lambda: _png_raw(S, S, 1, 0, b"\x00" * (S // 16) + b"\xff" * (S // 16)), _split((0, 0, 0), (255, 255, 255)), 0.0),
    "P png": (lambda: _palette_image(False), _split((255, 0, 0), (0, 0, 255)), 0.0),
    # transparent pixels are composited over white
    "P png transparency": (lambda: _palette_image(True), _split((255, 0, 0), (255, 255, 255)), 0.0),
    "RGBA png": (lambda: _encode(Image.new("RGBA", (S, S), (0, 0, 0, 128)), "PNG"),
                 _uniform((127,) * 3), 1 / 255),
    "RGBA png transparent": (lambda: _encode(Image.new("RGBA", (S, S), (0, 200, 0, 0)), "PNG"),
                             _uniform((255, 255, 255)), 0.0),
    "LA png": (lambda: _encode(Image.new("LA", (S, S), (0, 255)), "PNG"), _uniform((0, 0, 0)), 0.0),
    "CMYK tiff": (lambda: _encode(Image.new("CMYK", (S, S), (255, 0, 0, 0)), "TIFF"), _uniform((0, 255, 255)), 0.0),
    "CMYK jpeg": (lambda: _encode(Image.new("CMYK", (S, S), (0, 255, 0, 0)), "JPEG", quality=95),
                  _uniform((255, 0, 255)), 6 / 255),
    "RGB png": (lambda: _encode(Image.new("RGB", (S, S), (10, 20, 30)), "PNG"), _uniform((10, 20, 30)), 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_decodes_to_rgb_in_0_1(case):
    make, expected, tol = CASES[case]
    got = _decode(make())
    assert got.shape == (S, S, 3)
    assert np.abs(got - expected).max() <= tol + 1e-6, (case, got[0, 0], got[0, -1])


def test_non_finite_float_image_is_bad():
    with pytest.raises(Exception, match="NaN or infinite"):
        _decode(_encode(Image.new("F", (S, S), float("nan")), "TIFF"))


def test_16bit_mid_grey_through_the_pipeline(tmp_path):
    shard = write_tar(str(tmp_path / "g.tar"), [
        ("grey16", {"png": _encode(Image.new("I;16", (64, 64), 32768), "PNG"), "txt": b"grey"}),
        ("clear", {"png": _encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"), "txt": b"clear"})])
    pipe = build_pipeline(DataConfig(webdataset_path=shard, image_size=64, num_workers=0), batch_size=2)
    batch = next(pipe)
    pipe.close()
    images = dict(zip(batch["keys"], batch["images"]))
    assert abs(float(images["grey16"].mean()) - 0.5) <= 1 / 255 and float(images["grey16"].std()) == 0
    assert float(images["clear"].min()) == 1.0


# ----------------------------------------------------------------------------- oversized images

@pytest.fixture(scope="module")
def huge_png():
    """A real, decodable 20000 x 20000 1-bit PNG (about 50 KB; 1.2 GB as RGB)."""
    return _png_raw(20000, 20000, 1, 0, b"\x55" * 2500)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open
def test_oversized_image_is_bad_data_and_never_decoded(tmp_path, huge_png, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load

    def spy(self):  # records every pixel decode (PIL's decoding happens in load)
        loads.append(self.size)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)

    assert probe_size(huge_png) == (20000, 20000)  # header only: below PIL's own bound
    with pytest.raises(ImageTooLarge, match=r"20000x20000 = 400000000 pixels exceeds max_image_pixels"):
        probe_size(huge_png, 100_000_000)
    with pytest.raises(ImageTooLarge):
        load_to_bucket(huge_png, (64, 64), "center", np.random.default_rng(0), 100_000_000)
    shard = write_tar(str(tmp_path / "big.tar"), [
        ("ok0", make_sample(0, 64, 64)), ("huge", {"png": huge_png, "txt": b"too big"}),
        ("ok1", make_sample(1, 64, 64))])
    pipe = build_pipeline(DataConfig(webdataset_path=shard, image_size=64, num_workers=0), batch_size=1)
    keys = []
    while True:
        b = next(pipe)
        if b["epoch"] > 0:
            break
        keys += b["keys"]
    st = pipe.stats()
    pipe.close()
    assert sorted(keys) == ["ok0", "ok1"]
    assert st["bad"] == {"oversized_image": 1}
    assert [(r["reason"], r["url"], r["key"]) for r in st["records"]] == [("oversized_image", shard, "huge")]
    assert (20000, 20000) not in loads  # the 2.4 GB decode is never attempted


def test_pixel_limit_is_configurable_and_strict(tmp_path):
    shard = write_tar(str(tmp_path / "s.tar"), [(f"k{i}", make_sample(i, 64, 96)) for i in range(3)])
    pipe = build_pipeline(DataConfig(webdataset_path=shard, image_size=32, num_workers=0,
                                     max_image_pixels=64 * 96 - 1, strict=True), batch_size=1)
    with pytest.raises(DataError, match=r"oversized_image.*key=k\d.*96x64 = 6144 pixels exceeds"):
        next(pipe)
    pipe.close()
    for bad in (0, 1 << 29, 1.5e8, "100M", True):
        with pytest.raises(DataError, match=r"max_image_pixels: expected an integer in \[1, 268435456\]"):
            DataConfig(webdataset_path=shard, max_image_pixels=bad).validate()


# ----------------------------------------------------------------------------- malformed tar

def _malform_size(path: str, offset: int) -> None:
    """Replace the size field of the header at ``offset`` by non-octal digits, checksum valid."""
    with open(path, "r+b") as f:
        f.seek(offset)
        hdr = bytearray(f.read(512))
        hdr[124:136] = b"0000000019a\0"
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        f.seek(offset)
        f.write(hdr)


def test_malformed_header_unit():
    buf = io.BytesIO()
    write_tar_samples = [(f"{i:03d}", {"txt": b"t%d" % i, "jpg": b"j" * 700}) for i in range(4)]
    import tarfile
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, files in write_tar_samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = bytearray(buf.getvalue())
    offsets = [s.offset for s in iter_samples(io.BytesIO(bytes(data)))]
    hdr = data[offsets[2]:offsets[2] + 512]
    hdr[124:136] = b"0000000019a\0"
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data[offsets[2]:offsets[2] + 512] = hdr
    got = []
    with pytest.raises(TarMalformed, match=f"byte {offsets[2]}: size field") as e:
        for s in iter_samples(io.BytesIO(bytes(data))):
            got.append(s.key)
    assert got == ["000", "001"] and e.value.offset == offsets[2] and e.value.key == "002"
    # a pax record whose length field is 0 used to loop forever; a non-number raised ValueError
    for record in (b"0 path=x\n", b"zz path=x\n"):
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, len(record)
        b2 = io.BytesIO()
        b2.write(pax.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (512 - len(record)))
        b2.write(bytes(data[:offsets[1]]))
        with pytest.raises(TarMalformed, match="pax record length"):
            list(iter_samples(io.BytesIO(b2.getvalue())))


@pytest.mark.parametrize("workers", [0, 2])
def test_malformed_tar_header_costs_only_its_shard(tmp_path, caplog, workers):
    bad = write_tar(str(tmp_path / "bad.tar"), [(f"b{i}", make_sample(i, 64, 64)) for i in range(6)])
    goods = [write_tar(str(tmp_path / f"good{j}.tar"), [(f"g{j}_{i}", make_sample(10 + i, 64, 64))
                                                       for i in range(5)]) for j in range(3)]
    with open(bad, "rb") as f:
        offsets = {s.key: s.offset for s in iter_samples(f)}
    _malform_size(bad, offsets["b3"])
    pipe = build_pipeline(DataConfig(webdataset_path=[bad] + goods, image_size=64, num_workers=workers,
                                     shuffle_buffer=4), batch_size=2)
    keys = []
    with caplog.at_level(logging.WARNING, logger="core.data"):
        while True:
            b = next(pipe)
            if b["epoch"] > 0:
                break
            keys += b["keys"]
    st = pipe.stats()
    pipe.close()
    assert sorted(keys) == sorted(["b0", "b1", "b2"] + [f"g{j}_{i}" for j in range(3) for i in range(5)])
    # (with workers, the next epoch may already have read the bad shard again)
    assert set(st["bad"]) == {"malformed_tar"} and st["bad_shards"] == st["bad"]
    assert {(f["url"], f["offset"], f["key"]) for f in st["shard_faults"]} == {(bad, offsets["b3"], "b3")}
    assert f"data: shard {bad} failed at byte {offsets['b3']} (malformed_tar)" in caplog.text


# ----------------------------------------------------------------------------- visibility

def _counts_add_up(st: dict) -> None:
    assert st["read"] == st["seen"] + st["resumed"]
    assert st["read"] == (st["samples"] + st["waiting"] + sum(st["filtered"].values())
                          + sum(st["missing_key"].values()) + st["bad_samples"]), st


def _summary_adds_up(text: str) -> int:
    """Check every logged summary line; returns how many there were."""
    lines = re.findall(r"samples emitted (\d+) \+ waiting in buckets (\d+) \+ filtered out (\d+) \+ "
                       r"lacking a filter key (\d+) \+ bad (\d+) = read (\d+)", text)
    for *parts, read in lines:
        assert sum(map(int, parts)) == int(read), parts
    return len(lines)


@pytest.mark.parametrize("workers", [0, 2])
def test_summary_counts_add_up_with_samples_waiting(tmp_path, caplog, workers):
    samples = []
    for i in range(40):
        h, w = [(64, 64), (48, 96), (96, 48)][i % 3]
        files = make_sample(i, h, w)
        if i % 7 == 3:
            files["jpg"] = files["jpg"][:200]  # header fine, body cut: bad at decode, in its bucket
        if i % 11 == 5:
            files["jpg"] = b"junk"              # bad at admission
        if i % 13 == 6:
            del files["json"]                   # lacks the filter key
        samples.append((f"{i:03d}", files))
    shards = [write_tar(str(tmp_path / f"s{j}.tar"), samples[j * 10:(j + 1) * 10]) for j in range(4)]
    cfg = dict(webdataset_path=shards + [str(tmp_path / "gone.tar")], image_size=64, num_workers=workers,
               shuffle_buffer=5, multi_aspect_ratio=["1/1", "1/2", "2/1"], resampled=True,
               dataset_filters=[["aesthetic_score", "lambda s: s > 3.5"]], report_every=3)
    pipe = build_pipeline(DataConfig(**cfg), batch_size=4)
    with caplog.at_level(logging.INFO, logger="core.data"):
        for _ in range(8):
            next(pipe)
            _counts_add_up(pipe.stats())
        st = pipe.stats()
        state = pipe.state_dict()
        pipe.close()
    assert st["waiting"] > 0 and st["bad_samples"] > 0 and sum(st["filtered"].values()) > 0
    assert sum(st["missing_key"].values()) > 0 and st["bad_shards"].get("missing_shard", 0) >= 1
    assert _summary_adds_up(caplog.text) >= 3
    # resumed: the samples waiting at the save are read again and counted as such
    caplog.clear()
    pipe = build_pipeline(DataConfig(**cfg), batch_size=4, state=state)
    assert pipe.stats()["resumed"] == st["waiting"]
    with caplog.at_level(logging.INFO, logger="core.data"):
        for _ in range(4):
            next(pipe)
            _counts_add_up(pipe.stats())
        pipe.close()
    assert _summary_adds_up(caplog.text) >= 1 and "waiting at resume" in caplog.text


def test_shard_failing_mid_epoch_is_logged_at_once(tmp_path, caplog):
    """A shard cut off, or deleted while the epoch runs, is logged with its URL and reason when
    the pipeline hands out the first batch read after it, long before the periodic summary."""
    urls = {}
    for name in "abcd":
        urls[name] = write_tar(str(tmp_path / f"{name}.tar"),
                               [(f"{name}{i}", make_sample(i, 64, 64)) for i in range(6 if name == "a" else 4)])
    with open(urls["a"], "rb") as f:
        cut = {s.key: s.offset for s in iter_samples(f)}["a4"] + 700
    with open(urls["a"], "r+b") as f:
        f.truncate(cut)  # a: 4 complete samples, then cut inside a4
    pipe = build_pipeline(DataConfig(webdataset_path=list(urls.values()), image_size=64, num_workers=0,
                                     shuffle_buffer=1, report_every=1000), batch_size=2)
    order = [os.path.basename(u)[0] for u in pipe.spec.plan.shards(0, 0)]  # this epoch's shard order
    # deleted mid-epoch: the last shard in the order that is neither cut nor read first
    gone = [x for x in order[1:] if x != "a"][-1]
    batches: list[set[str]] = []
    logged_at: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="core.data"):
        while True:
            batch = next(pipe)
            batches.append({k[0] for k in batch["keys"]} if batch["epoch"] == 0 else {"next epoch"})
            for x, url in urls.items():
                if x not in logged_at and f"data: shard {url} failed" in caplog.text:
                    logged_at[x] = len(batches) - 1
            if batch["epoch"] > 0:
                break
            if len(batches) == 1:
                os.remove(urls[gone])
    text = caplog.text  # before close(), which logs the summary (captured when INFO is enabled)
    pipe.close()
    assert "samples emitted" not in text  # no summary yet: the lines came on their own
    assert f"data: shard {urls['a']} failed at byte {cut} (truncated_tar)" in text
    assert f"data: shard {urls[gone]} failed (missing_shard): no such file" in text
    assert sorted(logged_at) == sorted(["a", gone])
    for x in ("a", gone):
        later = set(order[order.index(x) + 1:]) | {"next epoch"}
        first_after = min(i for i, got in enumerate(batches) if got & later)
        assert logged_at[x] <= first_after, (x, order, batches, logged_at)
