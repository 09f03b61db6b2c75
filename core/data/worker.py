"""The per-worker stream: read shards, shuffle, filter, bucket, decode, batch.

Two sample formats share everything but the per-sample decoding: ``image`` samples (an encoded
image, bucketed by the bucket table, decoded when their bucket fills) and ``tensors`` samples
(a ``KEY.tensors.safetensors`` member, bucketed by the names/dtypes/shapes of its tensors, see
``tensors.py``), so a tensor dataset gets the same shard plan, shuffling, split and resume.

Everything per-sample happens here, inside a DataLoader worker process (or the main process when
``num_workers=0``). The stream is deterministic given (seed, epoch, rank, worker), and after every
item it reports a small *cursor* from which a new stream continues exactly:

* ``pos``: (shard index, byte offset, running sample index) of the first sample of the current
  shuffle block, and ``taken``: how many samples of that block were already processed. Samples are
  shuffled in blocks of ``shuffle_buffer`` so a block can be re-read and re-permuted on resume;
* ``left``: references (epoch, shard index, byte offset) of the samples waiting in buckets. Only
  encoded bytes wait in buckets (decoding happens when a bucket fills) and on resume they are
  fetched again by offset (buckets are listed in a fixed order, so the re-admitted samples
  rebuild the same buckets);
* ``epoch`` and ``counts`` (this epoch's samples admitted / emitted / decoded / undecodable).

Every batch is full (``batch_size`` samples of one bucket): at the end of an epoch the partial
buckets are NOT flushed, their samples wait and complete a batch with samples of the next epoch
(their references keep the epoch they were read in, so resume re-reads them exactly). Each sample
is therefore still used once per epoch cycle, only possibly later (a rare bucket may wait a few
epochs to fill). One-pass readers
(the encoder-cache tool) ask for ``partial_batches`` instead: the epoch's leftovers are flushed as
short batches.

All randomness of a sample (random bucket, caption choice, crop) comes from a generator seeded by
the sample's identity: (seed, epoch, shard name, key), where the shard name is the shard's path
relative to its configured source (``sources.expand_named_sources``). It depends neither on the
order of processing, nor on the rank/worker layout, nor on where the dataset is mounted.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .buckets import BucketTable
from .captions import CaptionGetter, MissingCaption
from .errors import DataError, ShardMissing
from .filters import FilterRule
from .images import (DEFAULT_MAX_PIXELS, BadImage, ImageTooLarge, image_ext, load_to_bucket, mask_member, mask_to_bucket,
                     probe_size)
from .plan import ShardPlan
from .sources import open_shard
from .stats import Stats
from .tario import RawSample, TarMalformed, TarTruncated, iter_samples
from .tensors import TENSORS_EXT, BadTensors, decode_tensors, probe_signature, signature_label

# Independent random streams of one sample. 2 was caption dropout (now owned by the training jobs):
# the crop keeps stream 3 so image batches stay bitwise what they were.
_S_BUCKET, _S_CAPTION, _S_CROP = 0, 1, 3

SAMPLE_FORMATS = ("image", "tensors")
#: dtypes of image batches: ``float32`` in [0, 1] (converted here, in the worker) or ``uint8`` in
#: [0, 255] (4x less to send; the consumer converts with ``core.data.device``)
IMAGE_DTYPES = ("float32", "uint8")


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable: sent to spawn/fork workers as is)."""

    plan: ShardPlan
    batch_size: int
    table: BucketTable
    crop: str
    filters: list[FilterRule]
    captions: CaptionGetter
    shuffle_buffer: int
    strict: bool
    sample_format: str = "image"   # one of SAMPLE_FORMATS
    max_pixels: int | None = DEFAULT_MAX_PIXELS   # DataConfig.max_image_pixels
    partial_batches: bool = False  # flush partial buckets at an epoch end (one-pass readers only)
    saliency: Any = None           # saliency function of crop 'smart' (smartcrop.py)
    image_dtype: str = "float32"   # one of IMAGE_DTYPES: the dtype of the ``images`` batches
    masks: str | None = None       # loss masks: None (not read), "full" or "error" for a sample without one


@dataclass
class Entry:
    """A sample waiting in a bucket (encoded bytes only)."""

    ref: list[int]                  # [epoch, shard index, byte offset]
    url: str
    key: str
    data: bytes                     # the encoded image, or the safetensors member
    caption: str
    meta: dict | None
    seed: int
    mask: bytes | None = None       # the KEY.mask.* member (masks on)


@dataclass
class _Pos:
    seq: int = 0      # index into this worker's shard list of the epoch
    offset: int = 0   # byte offset in that shard
    raw: int = 0      # running sample index in the epoch (for the modulo split)

    def as_list(self) -> list[int]:
        return [self.seq, self.offset, self.raw]


def sample_seed(seed: int, epoch: int, name: str, key: str) -> int:
    """The root of every random draw of one sample: ``name`` is its shard's name within the
    dataset (not its URL, so moving the data keeps the draws), ``key`` its webdataset key."""
    h = hashlib.blake2b(f"{seed}|{epoch}|{name}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


#: per-epoch counters of a worker, in the order of its cursor's and epoch_end item's ``counts`` list
EPOCH_COUNTS = ("admitted", "produced", "decoded", "undecodable")
_ADMITTED, _PRODUCED, _DECODED, _UNDECODABLE = range(len(EPOCH_COUNTS))


def sum_epoch_counts(per_worker: Sequence[Sequence[int]]) -> dict[str, int]:
    """The ``counts`` of several workers' epoch_end items added up, by name (:data:`EPOCH_COUNTS`)."""
    return {name: sum(counts[i] for counts in per_worker) for i, name in enumerate(EPOCH_COUNTS)}


def _rng(sample: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([sample, stream])


class WorkerStream:
    """Infinite iterator of items for one logical worker of one rank.

    Items are dicts with ``kind`` = ``'batch'`` | ``'epoch_end'`` | ``'error'`` plus ``worker``,
    ``cursor`` and ``stats`` (increments since the previous item).
    """

    def __init__(self, spec: StreamSpec, worker: int, cursor: dict | None = None,
                 shared_memory: bool = False):
        self.spec = spec
        # In a DataLoader worker, batches are built directly in shared memory, which spares the
        # copy torch would otherwise make to send them to the main process.
        self.shared_memory = shared_memory
        self.worker = worker
        self.g = spec.plan.global_worker(worker)
        self.cursor = cursor
        self.stats = Stats()
        self.tensors = spec.sample_format == "tensors"
        # image buckets are the fixed table; tensor buckets (signatures) appear as samples come
        self.buckets: dict[tuple, list[Entry]] = {} if self.tensors else {b: [] for b in spec.table.buckets}
        self.epoch = 0
        self.counts = [0, 0, 0, 0]    # this epoch's admitted / produced / decoded / undecodable
        self._names = spec.plan.name_map()
        self._shard_cache: dict[int, list[str]] = {}
        # With the sample-modulo split every worker reads every shard: let one report shard faults
        self._reports_shards = spec.plan.sample_modulo(worker) is None or self.g == 0

    def _bucket_order(self) -> list[tuple]:
        """Buckets in the order they are flushed and listed in the cursor (fixed, so that a
        resumed stream, which re-creates its buckets, flushes them in the same order)."""
        return list(self.spec.table.buckets) if not self.tensors else sorted(self.buckets)

    def _shards(self, epoch: int) -> list[str]:
        got = self._shard_cache.get(epoch)
        if got is None:
            if len(self._shard_cache) > 2:
                self._shard_cache.clear()
            got = self._shard_cache[epoch] = self.spec.plan.shards(epoch, self.worker)
        return got

    # ---------------------------------------------------------------- reading
    def _bad(self, reason: str, url: str, key: str | None, detail: str = "",
             shard_level: bool = False, offset: int | None = None) -> None:
        """Count a dropped sample, or with ``shard_level`` a shard fault (no sample was read:
        the shard, or its part from ``offset`` on, is skipped)."""
        if self.spec.strict:
            where = f"{url} key={key}" if key else url
            if offset is not None:
                where += f" byte {offset}"
            raise DataError(f"bad data ({reason}) in {where}: {detail} (strict: true)")
        if not shard_level:
            self.stats.bad_sample(reason, url, key, detail)
        elif self._reports_shards:
            self.stats.shard_fault(reason, url, key, detail, offset)

    def _read(self, epoch: int, pos: _Pos) -> Iterator[tuple[_Pos, str, RawSample]]:
        """Samples of this worker's shards from ``pos`` on, each with its own position."""
        shards = self._shards(epoch)
        modulo = self.spec.plan.sample_modulo(self.worker)
        raw = pos.raw
        for seq in range(pos.seq, len(shards)):
            url = shards[seq]
            start = pos.offset if seq == pos.seq else 0
            try:
                f = open_shard(url, start)
            except (FileNotFoundError, ShardMissing) as e:
                self._bad("missing_shard", url, None,
                          str(e) if isinstance(e, DataError) else "no such file", shard_level=True)
                continue
            except OSError as e:
                self._bad("unreadable_shard", url, None, f"{type(e).__name__}: {e}", shard_level=True)
                continue
            try:
                for s in iter_samples(f, start):
                    here = _Pos(seq, s.offset, raw)
                    raw += 1
                    if modulo is not None and here.raw % modulo[0] != modulo[1]:
                        continue
                    yield here, url, s
            except TarTruncated as e:
                reason = "malformed_tar" if isinstance(e, TarMalformed) else "truncated_tar"
                self._bad(reason, url, e.key, str(e), shard_level=True, offset=e.offset)
            finally:
                f.close()

    def scan(self, epoch: int = 0) -> Iterator[tuple[str, RawSample, tuple | None, Entry | None]]:
        """Every sample of this worker's shards of ``epoch`` in order, through the filters, captions
        and bucketing but not batched: ``(url, sample, bucket, entry)``, bucket and entry None for a
        dropped sample (counted in ``stats``). For reports over a dataset (``core.data.inspect``)."""
        for pos, url, s in self._read(epoch, _Pos()):
            bucket = self._admit(epoch, pos, url, s)
            yield url, s, bucket, (self.buckets[bucket].pop() if bucket is not None else None)

    def _fetch(self, ref: list[int]) -> tuple[str, RawSample] | None:
        """Re-read one waiting sample by its reference (resume)."""
        epoch, seq, offset = ref
        url = self._shards(epoch)[seq]
        try:
            f = open_shard(url, offset)
        except (OSError, ShardMissing):
            return None
        try:
            return url, next(iter_samples(f, offset))
        except (StopIteration, TarTruncated):
            return None
        finally:
            f.close()

    # ------------------------------------------------------------- per sample
    def _admit(self, epoch: int, pos: _Pos, url: str, s: RawSample) -> tuple | None:
        """Filter, caption and bucket one sample; returns its bucket, or None if dropped."""
        spec = self.spec
        meta = None
        if "json" in s.files:
            try:
                meta = json.loads(s.files["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                meta = None
                if spec.filters:
                    self._bad("bad_json", url, s.key, "unparseable .json")
                    return None
        for rule in spec.filters:
            if not isinstance(meta, dict) or rule.key not in meta:
                self.stats.missing_key[rule.key] += 1
                return None
            try:
                ok = rule(meta[rule.key])
            except Exception:  # noqa: BLE001 - e.g. comparing a string with a number
                ok = False
            if not ok:
                self.stats.filtered[rule.key] += 1
                return None
        if self.tensors:
            ext: str | None = TENSORS_EXT if TENSORS_EXT in s.files else None
            if ext is None:
                self._bad("missing_tensors", url, s.key, f"no .{TENSORS_EXT}; files: {sorted(s.files)}")
                return None
        else:
            ext = image_ext(s.files)
            if ext is None:
                self._bad("missing_image", url, s.key, f"files: {sorted(s.files)}")
                return None
        seed = sample_seed(self.spec.plan.seed, epoch, self._names[url], s.key)
        try:
            caption = spec.captions(s.files, meta if isinstance(meta, dict) else None,
                                    _rng(seed, _S_CAPTION))
        except MissingCaption as e:
            self._bad("missing_caption", url, s.key, f"{spec.captions.describe()}: {e}")
            return None
        if self.tensors:
            try:
                bucket: tuple = probe_signature(s.files[ext])
            except BadTensors as e:
                self._bad("undecodable_tensors", url, s.key, str(e))
                return None
        else:
            try:
                h, w = probe_size(s.files[ext], spec.max_pixels)
            except ImageTooLarge as e:
                self._bad("oversized_image", url, s.key, str(e))
                return None
            except BadImage as e:
                self._bad("undecodable_image", url, s.key, str(e))
                return None
            bucket = spec.table.choose(h, w, _rng(seed, _S_BUCKET))
        self.buckets.setdefault(bucket, []).append(Entry(
            ref=[epoch, pos.seq, s.offset], url=url, key=s.key, data=s.files[ext], caption=caption,
            meta=meta if isinstance(meta, dict) else None, seed=seed,
            mask=mask_member(s.files) if spec.masks else None))
        return bucket

    def _decode(self, e: Entry, bucket: tuple) -> object:
        if self.tensors:
            got = decode_tensors(e.data)
            # the header promised these names and shapes; a member that lies about them is damaged
            if sorted((k, tuple(v.shape)) for k, v in got.items()) != [(n, shape) for n, _d, shape in bucket]:
                raise BadTensors("decoded tensors differ from the header's names/shapes")
            return got
        image = load_to_bucket(e.data, bucket, self.spec.crop, _rng(e.seed, _S_CROP), self.spec.max_pixels,
                               self.spec.saliency)
        if not self.spec.masks:
            return image
        # the same crop draws as the image's (a fresh generator of the same seed): the same window
        mask = mask_to_bucket(e.data, e.mask, bucket, self.spec.crop, _rng(e.seed, _S_CROP))
        if mask is None:
            if self.spec.masks == "error":
                raise DataError(f"sample {e.key} in {e.url} has no mask (no {e.key}.mask.png and no alpha channel); "
                                f"add one, or set masked_loss_missing: full to train it at full weight")
            mask = np.full((1, *bucket), 255, dtype=np.uint8)
        return image, mask

    def _make_batch(self, bucket: tuple, flush: bool) -> dict | None:
        """Decode the bucket's first ``batch_size`` entries; None if bad samples left it short."""
        entries = self.buckets[bucket]
        want = min(len(entries), self.spec.batch_size)
        reason = "undecodable_tensors" if self.tensors else "undecodable_image"
        while True:
            take, images = entries[:want], []
            good: list[Entry] = []
            for e in take:
                try:
                    images.append(self._decode(e, bucket))
                    good.append(e)
                    self.counts[_DECODED] += 1
                except (BadImage, BadTensors) as exc:
                    entries.remove(e)
                    self.counts[_UNDECODABLE] += 1
                    self._bad("oversized_image" if isinstance(exc, ImageTooLarge) else reason,
                              e.url, e.key, str(exc))
            if len(good) == len(take):
                break
            if not flush and len(entries) < want:
                return None  # wait for more samples; the good ones are decoded again later
            want = min(want, len(entries))
        if not good:
            return None
        del entries[:len(good)]
        label = signature_label(bucket) if self.tensors else f"{bucket[0]}x{bucket[1]}"
        self.stats.buckets[label] += len(good)
        self.stats.samples += len(good)
        self.counts[_PRODUCED] += len(good)
        masks = None
        if self.spec.masks and not self.tensors:
            images, masks = [i for i, _ in images], [m for _, m in images]
        data = self._stack_tensors(bucket, images) if self.tensors else {"images": self._stack_images(bucket, images)}
        if masks is not None:  # uint8 (B, 1, h, w), 255 = full weight; the consumer converts like the images
            data["masks"] = out = self._empty((len(masks), 1, *bucket), torch.uint8)
            for i, m in enumerate(masks):
                out.numpy()[i] = m
        data.update(captions=[e.caption for e in good], keys=[e.key for e in good],
                    urls=[e.url for e in good], json=[e.meta for e in good],
                    sample_epochs=[e.ref[0] for e in good])
        return {"kind": "batch", "data": data}

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        if self.shared_memory:
            out.share_memory_()
        return out

    def _stack_images(self, bucket: tuple, images: list) -> torch.Tensor:
        h, w = bucket
        if self.spec.image_dtype == "uint8":
            out = self._empty((len(images), 3, h, w), torch.uint8)
            dst = out.numpy()
            for i, img in enumerate(images):
                dst[i] = img  # the one copy: decoded (h,w,3) view -> (3,h,w) in (shared) memory
            return out
        out = self._empty((len(images), 3, h, w), torch.float32)
        dst = out.numpy()
        for i, img in enumerate(images):
            # numpy (single-threaded) for the uint8 -> float step, written in place
            np.divide(img, np.float32(255.0), out=dst[i], casting="unsafe")
        return out

    def _stack_tensors(self, bucket: tuple, samples: list) -> dict[str, torch.Tensor]:
        out = {}
        for name, _dtype, shape in bucket:
            first = samples[0][name]
            out[name] = dst = self._empty((len(samples), *shape), first.dtype)
            for i, t in enumerate(samples):
                dst[i].copy_(t[name])
        return out

    # ---------------------------------------------------------------- driving
    def _item(self, item: dict, pos: _Pos, taken: int) -> dict:
        item["worker"] = self.worker
        item["epoch"] = self.epoch if item["kind"] != "epoch_end" else item["epoch"]
        item["cursor"] = {
            "epoch": self.epoch, "pos": pos.as_list(), "taken": taken, "counts": list(self.counts),
            "left": [e.ref for b in self._bucket_order() for e in self.buckets[b]],
        }
        item["stats"] = self.stats.take()
        return item

    def _restore_leftovers(self, refs: list[list[int]]) -> None:
        # The pipeline counts these samples as read (``Stats.resumed``) when it restores the
        # position; here each ends up waiting again, or counted as dropped, so the counts add up.
        for ref in refs:
            got = self._fetch(ref)
            if got is None:
                self._bad("lost_on_resume", self._shards(ref[0])[ref[1]], None,
                          f"the sample at byte {ref[2]} that was waiting in a bucket cannot be read again")
                continue
            url, s = got
            self._admit(ref[0], _Pos(ref[1], ref[2], 0), url, s)

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._run()
        except DataError as e:
            yield {"kind": "error", "worker": self.worker, "message": str(e),
                   "stats": self.stats.take(), "cursor": None, "epoch": self.epoch}

    def _run(self) -> Iterator[dict]:
        spec = self.spec
        c = self.cursor or {}
        self.epoch = int(c.get("epoch", 0))
        self.counts = [int(x) for x in c.get("counts", [0, 0, 0, 0])]
        pos = _Pos(*c.get("pos", [0, 0, 0]))
        skip = int(c.get("taken", 0))
        if c.get("left"):
            self._restore_leftovers(c["left"])
        while True:
            reader = self._read(self.epoch, pos)
            ended = False
            while not ended:
                chunk: list[tuple[_Pos, str, RawSample]] = []
                for item in reader:
                    chunk.append(item)
                    if len(chunk) == spec.shuffle_buffer:
                        break
                if len(chunk) < spec.shuffle_buffer:
                    ended = True
                if not chunk:
                    break
                start = chunk[0][0]
                order = np.random.default_rng([spec.plan.seed, self.epoch, self.g, start.raw, start.seq]
                                              ).permutation(len(chunk))
                for j in range(skip, len(chunk)):
                    p, url, s = chunk[int(order[j])]
                    self.stats.seen += 1
                    bucket = self._admit(self.epoch, p, url, s)
                    if bucket is not None:
                        self.counts[_ADMITTED] += 1
                    if bucket is not None and len(self.buckets[bucket]) >= spec.batch_size:
                        batch = self._make_batch(bucket, flush=False)
                        if batch is not None:
                            yield self._item(batch, start, j + 1)
                skip = 0
            end = _Pos(len(self._shards(self.epoch)), 0, 0)
            if spec.partial_batches and not spec.plan.resampled:
                # one-pass readers: the leftovers as short batches, so the epoch holds every sample
                for b in self._bucket_order():
                    while self.buckets[b]:
                        batch = self._make_batch(b, flush=True)
                        if batch is not None:
                            yield self._item(batch, end, 0)
            # otherwise the partial buckets carry over: their samples complete batches of the
            # next epoch, so every batch is full
            done_epoch, counts = self.epoch, self.counts
            self.epoch += 1
            self.counts = [0, 0, 0, 0]
            pos = _Pos()
            yield self._item({"kind": "epoch_end", "epoch": done_epoch, "counts": counts}, pos, 0)

