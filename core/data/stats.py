"""Counters for bad, filtered and bucketed samples, and the logged summaries.

Workers count into their own ``Stats`` and ship the increments with every item they send; the
main process merges them, so ``DataPipeline.stats()`` covers all workers.

The counts add up: every sample read (``seen``, plus ``resumed``: the samples that were waiting in
buckets in the saved position a pipeline resumed from) is emitted in a batch, waiting in a bucket
(a gauge the pipeline takes from the workers' positions), filtered out, lacking a filter key, or
bad (``bad_samples``). Faults of a whole shard (missing, unreadable, cut off, damaged header) are
counted by reason in ``bad`` too (and in ``bad_shards``), but are not samples read; each is kept in
``shard_faults`` with its URL and byte offset so the pipeline logs it as soon as it arrives.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("core.data")

#: Bad-sample and shard-fault records kept for reports (the counters themselves are exact).
MAX_RECORDS = 200


class Stats:
    """Bad samples by reason (with URL/key records), shard faults, filter drops, bucket counts."""

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()            # bad samples and shard faults, by reason
        self.bad_shards: Counter[str] = Counter()     # of those, the shard faults
        self.filtered: Counter[str] = Counter()       # rule evaluated false, by key
        self.missing_key: Counter[str] = Counter()    # sample lacks the filter key (or its json)
        self.buckets: Counter[str] = Counter()        # samples emitted per bucket "HxW"
        self.seen = 0                                  # samples read (after the rank/worker split)
        self.resumed = 0                               # samples waiting in the resumed position
        self.samples = 0                               # samples emitted in batches
        self.records: list[dict] = []                  # recent bad samples (reason, url, key, detail)
        self.shard_faults: list[dict] = []             # recent shard faults (+ offset)

    def bad_sample(self, reason: str, url: str, key: str | None, detail: str = "") -> None:
        """A sample that was read (``seen``/``resumed``) and is dropped."""
        self.bad[reason] += 1
        self.records.append({"reason": reason, "url": url, "key": key, "detail": detail})
        del self.records[:-MAX_RECORDS]

    def shard_fault(self, reason: str, url: str, key: str | None, detail: str = "",
                    offset: int | None = None) -> None:
        """A shard that could not be read (from ``offset`` on); ``key`` is the sample at the cut."""
        self.bad[reason] += 1
        self.bad_shards[reason] += 1
        self.shard_faults.append({"reason": reason, "url": url, "key": key, "detail": detail,
                                  "offset": offset, "shard": True})
        del self.shard_faults[:-MAX_RECORDS]

    @property
    def bad_samples(self) -> int:
        """Samples read and dropped as bad (shard faults excluded)."""
        return sum(self.bad.values()) - sum(self.bad_shards.values())

    def take(self) -> dict:
        """The increments since the last call, as a plain dict (then reset)."""
        d = self.as_dict()
        self.__init__()
        return d

    @staticmethod
    def new_records(d: dict) -> list[dict]:
        """The bad-sample and shard-fault records of an increment dict (from ``take``)."""
        return list(d.get("records", [])) + list(d.get("shard_faults", []))

    def merge(self, d: dict) -> None:
        self.bad.update(d.get("bad", {}))
        self.bad_shards.update(d.get("bad_shards", {}))
        self.filtered.update(d.get("filtered", {}))
        self.missing_key.update(d.get("missing_key", {}))
        self.buckets.update(d.get("buckets", {}))
        self.seen += d.get("seen", 0)
        self.resumed += d.get("resumed", 0)
        self.samples += d.get("samples", 0)
        # the records list holds both kinds (for reports); shard_faults only the shard ones
        self.records.extend(self.new_records(d))
        del self.records[:-MAX_RECORDS]
        self.shard_faults.extend(d.get("shard_faults", []))
        del self.shard_faults[:-MAX_RECORDS]

    def as_dict(self) -> dict:
        return {"bad": dict(self.bad), "bad_shards": dict(self.bad_shards), "bad_samples": self.bad_samples,
                "filtered": dict(self.filtered), "missing_key": dict(self.missing_key),
                "buckets": dict(self.buckets), "seen": self.seen, "resumed": self.resumed,
                "samples": self.samples, "records": list(self.records),
                "shard_faults": list(self.shard_faults)}

    def summary(self, waiting: int = 0) -> str:
        """One line of totals that add up (the per-sample records are logged separately).

        ``waiting``: samples currently waiting in buckets (the pipeline knows it, not the counters).
        """
        sample_bad = self.bad - self.bad_shards
        bad = ", ".join(f"{k}={v}" for k, v in sorted(sample_bad.items())) or "none"
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_shards.items())) or "none"
        filt = sum(self.filtered.values())
        miss = sum(self.missing_key.values())
        read = self.seen + self.resumed
        resumed = f" (incl. {self.resumed} waiting at resume)" if self.resumed else ""
        return (f"data: samples emitted {self.samples} + waiting in buckets {waiting} + filtered out "
                f"{filt} + lacking a filter key {miss} + bad {self.bad_samples} = read {read}"
                f"{resumed}; bad samples: {bad}; shard faults: {faults}")


def log_shard_fault(r: dict) -> None:
    """Log one shard fault the moment the pipeline learns of it."""
    at = f" at byte {r['offset']}" if r.get("offset") is not None else ""
    log.warning("data: shard %s failed%s (%s): %s; the rest of the shard is skipped this epoch",
                r["url"], at, r["reason"], r["detail"])


def log_report(stats: Stats, new_records: list[dict], max_lines: int = 20, waiting: int = 0) -> None:
    """Log the summary, then the bad samples and shard faults that appeared since the previous report."""
    log.info("%s", stats.summary(waiting))
    for r in new_records[:max_lines]:
        if r.get("shard"):
            at = f" byte {r['offset']}" if r.get("offset") is not None else ""
            log.warning("bad shard (%s): %s%s key=%s %s", r["reason"], r["url"], at, r["key"], r["detail"])
        else:
            log.warning("bad sample (%s): %s key=%s %s", r["reason"], r["url"], r["key"], r["detail"])
    if len(new_records) > max_lines:
        log.warning("... and %d more bad samples", len(new_records) - max_lines)
