"""Counters for bad, filtered and bucketed samples, and the logged summaries.

Workers count into their own ``Stats`` and ship the increments with every item they send; the
main process merges them, so ``DataPipeline.stats()`` covers all workers.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("core.data")

#: Bad-sample records kept for reports (the counters themselves are exact).
MAX_RECORDS = 200


class Stats:
    """Bad samples by reason (with URL/key records), filter drops, bucket counts."""

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()       # rule evaluated false, by key
        self.missing_key: Counter[str] = Counter()    # sample lacks the filter key (or its json)
        self.buckets: Counter[str] = Counter()        # samples emitted per bucket "HxW"
        self.seen = 0                                  # samples read (after the rank/worker split)
        self.samples = 0                               # samples emitted in batches
        self.records: list[dict] = []                  # recent bad samples (reason, url, key, detail)

    def bad_sample(self, reason: str, url: str, key: str | None, detail: str = "") -> None:
        self.bad[reason] += 1
        self.records.append({"reason": reason, "url": url, "key": key, "detail": detail})
        del self.records[:-MAX_RECORDS]

    def take(self) -> dict:
        """The increments since the last call, as a plain dict (then reset)."""
        d = self.as_dict()
        self.__init__()
        return d

    def merge(self, d: dict) -> None:
        self.bad.update(d.get("bad", {}))
        self.filtered.update(d.get("filtered", {}))
        self.missing_key.update(d.get("missing_key", {}))
        self.buckets.update(d.get("buckets", {}))
        self.seen += d.get("seen", 0)
        self.samples += d.get("samples", 0)
        self.records.extend(d.get("records", []))
        del self.records[:-MAX_RECORDS]

    def as_dict(self) -> dict:
        return {"bad": dict(self.bad), "filtered": dict(self.filtered),
                "missing_key": dict(self.missing_key), "buckets": dict(self.buckets),
                "seen": self.seen, "samples": self.samples, "records": list(self.records)}

    def summary(self) -> str:
        """One line of totals (the per-sample records are logged separately)."""
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items())) or "none"
        filt = sum(self.filtered.values())
        miss = sum(self.missing_key.values())
        return (f"data: {self.samples} samples emitted of {self.seen} read; bad: {bad}; "
                f"filtered out: {filt}; missing filter key: {miss}")


def log_report(stats: Stats, new_records: list[dict], max_lines: int = 20) -> None:
    """Log the summary, then the bad samples that appeared since the previous report."""
    log.info("%s", stats.summary())
    for r in new_records[:max_lines]:
        log.warning("bad sample (%s): %s key=%s %s", r["reason"], r["url"], r["key"], r["detail"])
    if len(new_records) > max_lines:
        log.warning("... and %d more bad samples", len(new_records) - max_lines)
