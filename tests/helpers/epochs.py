"""Reading whole epochs from a data pipeline whose batches are always full.

Partial buckets carry over into the next epoch, so the samples read in epoch ``e`` come out in
batches labelled ``e`` or later; each batch's ``sample_epochs`` says which epoch each sample was
read in. These helpers read until every sample of the requested epochs has come out."""
from __future__ import annotations


def epochs_done(pipe, epochs: int) -> bool:
    """Every worker is past epoch ``epochs - 1`` and none of its samples still waits in a bucket."""
    state = pipe.state_dict()
    waiting = [ref for w in state["workers"].values() for ref in w.get("left", [])]
    return pipe.epoch >= epochs and not any(ref[0] < epochs for ref in waiting)


def take_samples(pipe, epochs: int, max_batches: int = 1000) -> tuple[list[list[dict]], list[dict]]:
    """(per epoch 0..epochs-1 the samples read in it, in the order they came out; every batch
    read). A sample is ``{"key", "url", "json", "caption", "batch"}`` (``batch``: its index)."""
    out: list[list[dict]] = [[] for _ in range(epochs)]
    batches: list[dict] = []
    while not epochs_done(pipe, epochs):
        if len(batches) >= max_batches:
            raise AssertionError(f"epochs 0..{epochs - 1} not complete after {max_batches} batches")
        b = next(pipe)
        assert len(b["keys"]) == pipe.batch_size, "a short batch"
        for i, (k, e) in enumerate(zip(b["keys"], b["sample_epochs"])):
            if e < epochs:
                out[e].append({"key": k, "url": b["urls"][i], "json": b["json"][i],
                               "caption": b["captions"][i], "batch": len(batches)})
        batches.append(b)
    return out, batches


def epoch_keys(pipe, epochs: int) -> list[list[str]]:
    """Keys of the samples read in epochs 0..epochs-1, by epoch, in the order they came out."""
    return [[s["key"] for s in e] for e in take_samples(pipe, epochs)[0]]
