"""``build_pipeline``: the training loop's view of the data (an endless iterator of batches)."""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import weakref
from typing import Any, Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .captions import make_caption_getter
from .config import DataConfig
from .device import batch_images_to_float
from .errors import DataError, for_key
from .filters import parse_filters
from .plan import ShardPlan
from .signals import blocked_while_starting, ignore_in_worker
from .sources import expand_named_sources
from .stats import Stats, log_report, log_shard_fault
from .worker import IMAGE_DTYPES, SAMPLE_FORMATS, StreamSpec, WorkerStream, sum_epoch_counts

log = logging.getLogger("core.data")

STATE_VERSION = 1


def _identity(x):
    return x


# Pipelines whose workers may be running. The workers ignore SIGTERM (signals.py), so the
# SIGTERM with which multiprocessing ends daemon children at interpreter exit would not end them
# and its join would wait forever: close what is still open before that (atexit runs the most
# recently registered function first, and this module imports torch's DataLoader before it).
_OPEN: "weakref.WeakSet[DataPipeline]" = weakref.WeakSet()


@atexit.register
def _close_open_pipelines() -> None:
    for pipeline in list(_OPEN):
        pipeline.close()


class _Streams(IterableDataset):
    """Hands each DataLoader worker its logical stream.

    DataLoader serves workers strictly round-robin, so the batch order is deterministic. On
    resume the physical-to-logical mapping is rotated so the worker due next comes first.
    """

    def __init__(self, spec: StreamSpec, workers: int, rotate: int, cursors: dict[int, dict]):
        self.spec, self.workers, self.rotate, self.cursors = spec, workers, rotate, cursors

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotate) % self.workers
        if info is not None:
            torch.set_num_threads(1)  # workers run in parallel already; avoid oversubscription
        return iter(WorkerStream(self.spec, logical, self.cursors.get(logical),
                                 shared_memory=info is not None))


def _fingerprint(names: list[str], spec_bits: tuple) -> str:
    # shard names, not URLs: a saved position stays valid when the dataset is moved
    h = hashlib.sha256(repr((names, spec_bits)).encode())
    return h.hexdigest()[:16]


class DataPipeline:
    """Endless iterator of single-bucket batches with an exact-resume position.

    Batches of ``sample_format='image'``: ``images`` (B,3,h,w) float32 in [0,1] (``image_dtype=
    'uint8'``: uint8 in [0,255], converted by the consumer with :meth:`to_device`), ``captions``,
    ``keys``, ``urls``, ``json``, ``sample_epochs`` (lists of length B: the epoch each sample
    was read in) and ``epoch`` (the epoch the worker is in; a batch may open with samples carried
    over from an earlier epoch). Of ``'tensors'``: one
    stacked tensor (B, *shape) per tensor name of the samples, in its stored dtype, instead of
    ``images``. Every batch holds exactly ``batch_size`` samples, unless ``partial_batches``.
    Epochs advance by themselves.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int | None = None, state: dict | None = None,
                 transform_size: int | None = None, sample_format: str = "image",
                 partial_batches: bool = False, saliency: Any = None,
                 image_dtype: str = "float32", source_key: str = "webdataset_path",
                 masks: str | None = None):
        #: the config key that named this data: every error says which data set it is about
        self.source_key = source_key
        # explicit: a composed config class (TrainingConfig) may define its own validate()
        DataConfig.validate(cfg)
        if sample_format not in SAMPLE_FORMATS:
            raise DataError(f"sample_format: expected one of {list(SAMPLE_FORMATS)}, got {sample_format!r}")
        if image_dtype not in IMAGE_DTYPES:
            raise DataError(f"image_dtype: expected one of {list(IMAGE_DTYPES)}, got {image_dtype!r}")
        self.image_dtype = image_dtype
        if masks not in (None, "full", "error"):
            raise DataError(f"masks: expected None, 'full' or 'error', got {masks!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: the per-rank batch size must be an integer >= 1, got {batch_size!r}")
        if not (0 <= rank < world_size):
            raise DataError(f"data pipeline: rank {rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        self.batch_size = batch_size
        self.num_workers = cfg.num_workers if num_workers is None else int(num_workers)
        self.workers = max(1, self.num_workers)
        try:
            named = expand_named_sources(cfg.webdataset_path)
        except DataError as exc:
            raise for_key(exc, source_key) from None
        urls, names = [u for u, _ in named], [n for _, n in named]
        plan = ShardPlan(urls, seed, rank, world_size, self.workers, cfg.resampled, names)
        if plan.split_by_sample:
            log.warning("data: %d shard(s) for %d rank(s) x %d worker(s): every worker reads every "
                        "shard and keeps 1/%d of the samples; write more shards to avoid re-reading",
                        len(urls), world_size, self.workers, plan.total_workers)
        crop = resolve_crop(cfg.crop, cfg.multi_aspect_ratio, saliency)
        if masks is not None and sample_format == "image" and crop == "smart":
            raise DataError("loss masks do not combine with crop: smart (the mask must be cut like the image); "
                            "use crop: random or center")
        self.spec = StreamSpec(
            plan=plan, batch_size=batch_size, table=cfg.bucket_table(transform_size), crop=crop, saliency=saliency,
            filters=parse_filters(cfg.dataset_filters),
            captions=make_caption_getter(cfg.captions_getter, cfg.caption_key, cfg.tag_options()),
            shuffle_buffer=cfg.shuffle_buffer, strict=cfg.strict, sample_format=sample_format,
            max_pixels=cfg.max_image_pixels, partial_batches=bool(partial_batches), image_dtype=image_dtype,
            masks=masks if sample_format == "image" else None)
        bits: tuple = (seed, rank, world_size, self.workers, cfg.resampled, cfg.shuffle_buffer)
        if sample_format != "image":  # image fingerprints stay what they were (saved states remain valid)
            bits += (sample_format,)
        self._fp = _fingerprint(names, bits)
        self._stats = Stats()
        self._pending: list[dict] = []   # bad-sample records not logged yet
        self._batches = 0
        self._epoch_ends: dict[int, list[list[int]]] = {}   # epoch -> each worker's epoch counts
        self._empty_streak = 0                         # consecutive epochs without any sample
        self._decoded = False                          # some sample of this rank decoded, ever
        self._cursors: dict[int, dict] = {}
        self._next = 0
        self._restore(state)
        ds = _Streams(self.spec, self.workers, self._next, dict(self._cursors))
        if self.num_workers == 0:
            self._loader = None
            self._it: Iterator[dict] = iter(ds)
        else:
            # batch_size=None: each worker already forms whole single-bucket batches
            self._loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, prefetch_factor=2,
                                      pin_memory=torch.cuda.is_available(),
                                      worker_init_fn=ignore_in_worker)
            # the workers start here and must not die of a signal sent to the process group
            with blocked_while_starting():
                self._it = iter(self._loader)
            _OPEN.add(self)
        self._closed = False

    # ------------------------------------------------------------------ state
    def _restore(self, state: dict | None) -> None:
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state: unsupported version {state.get('version')!r}")
        workers = {int(k): v for k, v in state.get("workers", {}).items()}
        if state.get("fingerprint") != self._fp:
            # Positions are meaningless for another shard list or worker layout: start the next
            # epoch cleanly rather than repeat or skip part of the current one.
            nxt = max([c["epoch"] for c in workers.values()] or [-1]) + 1
            log.warning("data: the saved data position was made with other shards or another "
                        "rank/worker layout; resuming at the start of epoch %d", nxt)
            self._cursors = {w: {"epoch": nxt} for w in range(self.workers)}
            return
        self._cursors = workers
        # the samples waiting in buckets at the save are read again by the workers
        self._stats.resumed = sum(len(c.get("left") or []) for c in workers.values())
        self._next = int(state.get("next_worker", 0)) % self.workers
        self._batches = int(state.get("batches", 0))
        self._decoded = bool(state.get("decoded", self._batches > 0))

    def state_dict(self) -> dict:
        """Small JSON-able position: pass it as ``state=`` to continue exactly after the last batch."""
        return {
            "version": STATE_VERSION, "fingerprint": self._fp, "next_worker": self._next,
            "batches": self._batches, "epoch": self.epoch, "decoded": self._decoded,
            "workers": {str(w): c for w, c in sorted(self._cursors.items())},
        }

    @property
    def epoch(self) -> int:
        """The oldest epoch any worker of this rank is still in."""
        if not self._cursors:
            return 0
        return min(int(self._cursors.get(w, {"epoch": 0})["epoch"]) for w in range(self.workers))

    # -------------------------------------------------------------- iterating
    def __iter__(self) -> "DataPipeline":
        return self

    def __next__(self) -> dict:
        try:
            return self._next_batch()
        except DataError as exc:
            raise for_key(exc, self.source_key) from None

    def _next_batch(self) -> dict:
        if self._closed:
            raise DataError("data pipeline is closed")
        while True:
            item = next(self._it)
            w = item["worker"]
            self._pending.extend(Stats.new_records(item["stats"]))
            self._stats.merge(item["stats"])
            for fault in item["stats"].get("shard_faults", []):
                log_shard_fault(fault)  # now, not only in the next summary
            if item["kind"] == "error":
                raise DataError(item["message"])
            self._cursors[w] = item["cursor"]
            self._next = (w + 1) % self.workers
            if item["kind"] == "epoch_end":
                self._epoch_end(item["epoch"], w, item["counts"])
                continue
            self._batches += 1
            if self._batches % self.cfg.report_every == 0:
                self._report()
            batch = item["data"]
            batch["epoch"] = item["epoch"]
            return batch

    def to_device(self, batch: dict, device: "torch.device | str | None" = None) -> dict:
        """``batch`` ready to train on ``device``: uint8 ``images`` moved there (a quarter of the
        float32 bytes) and converted to float32 in [0, 1], bitwise the ``image_dtype='float32'``
        batch; other entries unchanged. Float batches pass through unchanged (not moved)."""
        if self.image_dtype == "uint8":
            batch_images_to_float(batch, "images", device)
        batch_images_to_float(batch, "masks", device)  # always uint8 from the workers
        return batch

    def _epoch_end(self, epoch: int, worker: int, counts: list[int]) -> None:
        got = self._epoch_ends.setdefault(epoch, [])
        got.append(counts)
        if len(got) < self.workers:
            return
        del self._epoch_ends[epoch]
        total = sum_epoch_counts(got)
        self._decoded = self._decoded or total["decoded"] > 0
        self._empty_streak = self._empty_streak + 1 if total["admitted"] == 0 else 0
        s = self._stats
        # Batches may wait for the next epoch (partial buckets carry over), so "no batch this
        # epoch" proves nothing; an epoch in which no sample at all was admitted does: it covers
        # all of this rank's shards. A resampled pseudo-epoch is a random draw of shards: ask for
        # several in a row. And samples that are admitted but never decode never make a batch.
        if total["produced"] == 0 and total["undecodable"] > 0 and not self._decoded:
            last = s.records[-1] if s.records else None
            where = f" (last: {last['url']} key={last['key']})" if last else ""
            raise DataError(
                f"no sample survived epoch {epoch} on rank {self.spec.plan.rank}: none could be decoded "
                f"({total['undecodable']} undecodable this epoch), bad: {dict(s.bad)}{where}; check the "
                f"shards with python3 -m core.data.inspect --decode")
        if self._empty_streak >= (3 if self.cfg.resampled else 1):
            raise DataError(
                f"no sample survived epoch {epoch} on rank {self.spec.plan.rank} "
                f"({self.spec.plan.total_workers} reader(s) over {len(self.spec.plan.urls)} shard(s)): "
                f"{s.seen} read, {sum(s.filtered.values())} filtered out "
                f"({dict(s.filtered)}), {sum(s.missing_key.values())} lacking a filter key "
                f"({dict(s.missing_key)}), bad: {dict(s.bad)}; check webdataset_path and "
                f"dataset_filters")

    # ------------------------------------------------------------- reporting
    def _waiting(self) -> int:
        """Samples waiting in the workers' buckets (as of each worker's last item)."""
        return sum(len(c.get("left") or []) for c in self._cursors.values())

    def _report(self) -> None:
        log_report(self._stats, self._pending, waiting=self._waiting())
        self._pending = []

    def stats(self) -> dict:
        """Counters so far: bad samples by reason (+ recent records with URL/key; shard faults
        also in ``bad_shards`` / ``shard_faults`` with the byte offset), filter drops, samples per
        bucket, batches, current epoch, and the totals that add up: ``read`` (``seen`` +
        ``resumed``) = ``samples`` (emitted) + ``waiting`` (in buckets) + filtered + lacking a
        filter key + ``bad_samples``."""
        d = self._stats.as_dict()
        d["waiting"] = self._waiting()
        d["read"] = self._stats.seen + self._stats.resumed
        d["batches"] = self._batches
        d["epoch"] = self.epoch
        return d

    def close(self) -> None:
        """Stop the workers and log the final bad-data summary."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._report()
        it, self._it = self._it, iter(())
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        # The shutdown ends a worker still busy after its grace period with SIGTERM, which the
        # workers ignore (signals.py): without SIGKILL one stuck reading a shard would keep the
        # process from exiting (multiprocessing joins its children at exit).
        for worker in getattr(it, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        self._loader = None

    def __enter__(self) -> "DataPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


Source = Union[DataConfig, str, os.PathLike, Sequence[str]]


def build_pipeline(cfg: Source, batch_size: int, rank: int = 0, world_size: int = 1,
                   seed: int = 0, num_workers: int | None = None, state: dict | None = None,
                   transform_size: int | None = None, sample_format: str = "image",
                   partial_batches: bool = False, saliency: Any = None,
                   image_dtype: str = "float32", source_key: str = "webdataset_path",
                   masks: str | None = None) -> DataPipeline:
    """Build the data pipeline of one rank.

    ``cfg`` is a ``DataConfig``, or just the ``webdataset_path`` (a path/URL or a list of them:
    every other key at its default). ``batch_size`` is per rank; ``num_workers`` overrides
    ``cfg.num_workers``; ``state`` is a previous ``state_dict()`` to resume from;
    ``transform_size`` overrides ``cfg.image_size`` (e.g. a job that trains at another resolution
    than the config's bucket area). ``sample_format``: ``'image'`` (encoded images, bucketed by
    aspect ratio) or ``'tensors'`` (``KEY.tensors.safetensors`` members, batched by equal tensor
    shapes; the image keys ``image_size``, ``multi_aspect_ratio``, ``bucket_random_ratio`` and
    ``crop`` are then unused). Every batch holds exactly ``batch_size`` samples: the partial
    buckets of an epoch end carry over into the next epoch. ``partial_batches=True`` (for
    one-pass readers that stop after epoch 0, never for training) flushes them as short batches.
    ``saliency``: the saliency function of ``crop: smart`` (a picklable callable, e.g. an
    ``nn.Module``, ``(1, 3, h, w)`` in [0, 1] -> ``(1, 1, h', w')``; see ``smartcrop.py``), run in
    the workers.
    ``image_dtype='uint8'``: the workers send uint8 images (no float conversion in the workers, a
    quarter of the bytes between processes and to the device); ``DataPipeline.to_device`` then
    converts them on the training device to the same float32 values.
    ``source_key``: the config key that named the data (``validation_webdataset_path``, ...); its
    errors name it instead of ``webdataset_path``.
    ``masks``: also read each sample's loss mask (``KEY.mask.png``, else the image's alpha channel),
    cropped and bucketed with the image, as ``masks`` uint8 (B, 1, h, w) (255 = full weight);
    ``"full"``: a sample without one gets a full mask, ``"error"``: it stops the run (DataError).
    """
    if not isinstance(cfg, DataConfig):
        path = os.fspath(cfg) if isinstance(cfg, os.PathLike) else cfg
        cfg = DataConfig(webdataset_path=path if isinstance(path, str) else [os.fspath(p) for p in path])
    return DataPipeline(cfg, batch_size, rank, world_size, seed, num_workers, state, transform_size,
                        sample_format, partial_batches, saliency, image_dtype, source_key, masks)


def resolve_crop(crop: str, multi_aspect_ratio: Any, saliency: Any) -> str:
    """The crop a pipeline uses: ``auto`` is ``smart`` for fixed-size training when a saliency
    function is given (where the official code used SmartCrop), else ``random``; ``smart``
    without a saliency function is an error."""
    if crop == "auto":
        return "smart" if saliency is not None and multi_aspect_ratio is None else "random"
    if crop == "smart" and saliency is None:
        raise DataError("crop: 'smart' needs a saliency function (build_pipeline(..., saliency=...); the "
                        "training jobs build it from saliency_model_path); or choose crop: random or center")
    if saliency is not None and not callable(saliency):
        raise DataError(f"saliency: expected a callable (image batch -> map), got {type(saliency).__name__}")
    return crop
