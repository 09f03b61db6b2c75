"""Concepts: several datasets in one Stage C run, each with its repeats or weight, its own caption
options and its own regularization flag (kohya's dataset subsets with ``num_repeats``, OneTrainer's
concepts)::

    concepts:
      - {name: subject, path: data/ohwx_dog, repeats: 10, caption_tag_shuffle: true}
      - {name: dogs, path: data/class_dogs/, repeats: 1, regularization: true}

Each concept is a data pipeline of its own (any form ``webdataset_path`` takes: shards, folders,
image folders, URLs, ``.yml`` lists), with the run's data keys except its own ``path`` and the
caption / filter keys it sets. Each micro-step takes its WHOLE micro-batch (on every rank) from one
concept, so batches keep one bucket and one forward. Which concept is fixed per micro-step by a
pure function of the global micro-step index:

* the shares: with ``repeats`` a concept's share of the micro-batches is ``repeats * samples``
  over the sum (kohya's epoch; the samples are counted once at start, reading the tar headers
  / the folder listing); with ``weight`` it is ``weight`` over the sum (no counting);
* a mixing cycle of ``concepts_cycle`` micro-batches (default: with repeats, the kohya epoch in
  micro-batches; with weights, 100) holds exactly ``round(share * cycle)`` slots of each concept
  (largest remainders), in an order shuffled per cycle from (seed, cycle). So the mix over a cycle
  is exact, every rank takes the same concept at the same micro-step, and a resume continues the
  sequence exactly (the checkpoint holds the micro-step count and each concept's data position).

A concept with ``regularization: true`` is prior-preservation data: its samples' losses are
multiplied by ``regularization_weight`` (kohya's prior_loss_weight), as the samples of
``regularization_webdataset_path`` are (which ``concepts`` replaces: the two keys do not combine).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from core.config import doc
from core.errors import UserError
from core.seeding import derive_seed

__all__ = ["ConceptsConfig", "Concept", "ConceptPipeline", "parse_concepts", "concept_slots", "concept_at",
           "build_concept_pipeline", "CONCEPT_KEY", "CONCEPT_REG_KEY"]

log = logging.getLogger("cascade.train")

#: batch keys set by the concept pipeline: the concept's name and whether it is regularization data
CONCEPT_KEY = "concept"
CONCEPT_REG_KEY = "concept_regularization"
#: the data keys a concept may set for itself
CONCEPT_DATA_KEYS = ("caption_key", "captions_getter", "caption_tag_shuffle", "caption_keep_tags",
                     "caption_tag_dropout", "dataset_filters")
_OWN_KEYS = ("name", "path", "repeats", "weight", "regularization")
DEFAULT_WEIGHT_CYCLE = 100


@dataclass(frozen=True)
class Concept:
    """One parsed entry of ``concepts``."""

    name: str
    path: Any
    repeats: Optional[int] = None
    weight: Optional[float] = None
    regularization: bool = False
    data: tuple = ()  # ((data key, value), ...) overriding the run's data keys

    def data_config(self, base: Any) -> Any:
        """The concept's ``DataConfig``: the run's data keys, its path and its own caption/filter keys."""
        from core.data import DataConfig

        keys = {f.name: getattr(base, f.name) for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{**keys, "webdataset_path": self.path, **dict(self.data)})


@dataclass
class ConceptsConfig:
    """Keys of the concepts (Stage C jobs)."""

    concepts: Optional[list[dict[str, Any]]] = doc(
        None, "Several datasets in one run, replacing webdataset_path: a list of {path, repeats | weight, name, "
              "regularization, caption_key, captions_getter, caption_tag_shuffle, caption_keep_tags, "
              "caption_tag_dropout, dataset_filters}. path: any form webdataset_path takes; repeats: share of the "
              "micro-batches = repeats x the concept's samples (kohya's num_repeats); weight: share = weight (all "
              "concepts use one of the two); regularization: true = prior-preservation data (loss x "
              "regularization_weight). Each micro-batch comes from one concept; the mix is exact over each "
              "concepts_cycle and repeats exactly on resume and over ranks (train/concepts.py).")
    concepts_cycle: Optional[int] = doc(
        None, "Micro-batches per concept mixing cycle, over which the shares are exact (None: with repeats, the "
              "kohya epoch = sum(repeats x samples) / global micro-batch; with weights, 100).")

    def validate_concepts(self) -> None:
        if self.concepts is None:
            if self.concepts_cycle is not None:
                raise UserError("config key 'concepts_cycle' applies with 'concepts' only; remove it")
            return
        parse_concepts(self.concepts)
        if self.concepts_cycle is not None and self.concepts_cycle < 1:
            raise UserError(f"config key 'concepts_cycle' must be >= 1, got {self.concepts_cycle}")
        for key in ("webdataset_path", "regularization_webdataset_path", "cache_path"):
            if getattr(self, key, None):
                raise UserError(f"config keys 'concepts' and '{key}' do not combine: list every dataset under "
                                f"concepts (regularization data with regularization: true); remove '{key}'")


def parse_concepts(entries: Any) -> list[Concept]:
    """The ``concepts`` list as :class:`Concept` objects; UserError naming ``concepts[i].key``."""
    from core.data import DataConfig, DataError

    if not isinstance(entries, list) or not entries:
        raise UserError("config key 'concepts' must be a non-empty list of {path, repeats | weight, ...} mappings")
    out: list[Concept] = []
    for i, entry in enumerate(entries):
        where = f"config key 'concepts[{i}]'"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with 'path', got {entry!r}")
        unknown = sorted(set(map(str, entry)) - set(_OWN_KEYS) - set(CONCEPT_DATA_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: "
                            f"{', '.join(_OWN_KEYS + CONCEPT_DATA_KEYS)})")
        if "path" not in entry:
            raise UserError(f"{where}: has no 'path' (a dataset in any form webdataset_path takes)")
        repeats, weight = entry.get("repeats"), entry.get("weight")
        if (repeats is None) == (weight is None):
            raise UserError(f"{where}: give exactly one of 'repeats' (an integer >= 1) and 'weight' (a number > 0)")
        if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
            raise UserError(f"{where}.repeats: expected an integer >= 1, got {repeats!r}")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not math.isfinite(weight) or weight <= 0):
            raise UserError(f"{where}.weight: expected a finite number > 0, got {weight!r}")
        name = entry.get("name", f"concept_{i}")
        if not isinstance(name, str) or not name or any(c in name for c in "/\\\n"):
            raise UserError(f"{where}.name: expected a short name without '/' or newlines, got {name!r}")
        reg = entry.get("regularization", False)
        if not isinstance(reg, bool):
            raise UserError(f"{where}.regularization: expected true or false, got {reg!r}")
        data = tuple((k, entry[k]) for k in CONCEPT_DATA_KEYS if k in entry)
        concept = Concept(name, entry["path"], repeats, None if weight is None else float(weight), reg, data)
        try:
            concept.data_config(DataConfig()).validate()  # path and caption keys, no file access
        except (DataError, TypeError) as exc:
            raise UserError(f"{where}: {exc}") from None
        out.append(concept)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise UserError(f"config key 'concepts': names must differ, got {names}")
    if len({c.repeats is None for c in out}) > 1:
        raise UserError("config key 'concepts': use 'repeats' in every concept or 'weight' in every concept, not both "
                        "(repeats count samples, weights do not)")
    return out


def concept_slots(shares: list[float], cycle: int) -> list[int]:
    """Slots per concept in a cycle of ``cycle`` micro-batches: ``share * cycle`` rounded by largest
    remainders (ties to the earlier concept), so they add up to ``cycle``."""
    total = sum(shares)
    exact = [s / total * cycle for s in shares]
    slots = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - slots[i]), i))
    for i in order[:cycle - sum(slots)]:
        slots[i] += 1
    return slots


def concept_at(k: int, slots: list[int], seed: int) -> int:
    """The concept of global micro-step ``k`` (0-based): slot ``k % cycle`` of cycle ``k // cycle``,
    whose slot list is shuffled from (seed, cycle)."""
    cycle = sum(slots)
    order = np.repeat(np.arange(len(slots)), slots)
    rng = np.random.default_rng(derive_seed(seed, "concepts", k // cycle))
    return int(order[rng.permutation(cycle)[k % cycle]])


class ConceptPipeline:
    """One data pipeline per concept; ``next()`` takes the micro-batch from the concept of the
    current micro-step. ``state_dict()`` = the micro-step count + every concept's position."""

    def __init__(self, concepts: list[Concept], pipes: list[Any], slots: list[int], seed: int, start: int = 0) -> None:
        self.concepts, self.pipes, self.slots, self.seed = concepts, pipes, slots, seed
        self.k = start
        self.taken = [0] * len(concepts)

    def __iter__(self) -> "ConceptPipeline":
        return self

    def __next__(self) -> dict:
        i = concept_at(self.k, self.slots, self.seed)
        batch = next(self.pipes[i])
        self.k += 1
        self.taken[i] += 1
        batch[CONCEPT_KEY] = self.concepts[i].name
        batch[CONCEPT_REG_KEY] = self.concepts[i].regularization
        return batch

    def to_device(self, batch: dict, device: Any = None) -> dict:
        names = [c.name for c in self.concepts]
        return self.pipes[names.index(batch[CONCEPT_KEY])].to_device(batch, device)

    def state_dict(self) -> dict:
        return {"micro_steps": self.k, "slots": list(self.slots),
                "concepts": {c.name: p.state_dict() for c, p in zip(self.concepts, self.pipes)}}

    def stats(self) -> dict:
        return {c.name: {**p.stats(), "micro_batches_taken": t}
                for c, p, t in zip(self.concepts, self.pipes, self.taken)}

    def close(self) -> None:
        for p in self.pipes:
            p.close()


def count_samples(concept: Concept, base: Any) -> int:
    """The usable samples of a concept (its shards' headers / folder listing read once, filters applied)."""
    from core.data.inspect import inspect

    n = int(inspect(concept.data_config(base))["usable"])
    if n == 0:
        raise UserError(f"concept '{concept.name}' ({concept.path}): no usable sample (check its path and filters)")
    return n


def build_concept_pipeline(cfg: Any, batch_size: int, world_size: int, state: Optional[dict],
                           options: dict) -> ConceptPipeline:
    """The concept pipelines of one rank (``batch_size`` per rank per micro-step; ``options``: the
    job's shared ``build_pipeline`` keywords) and the mixing plan; logs the per-concept summary."""
    from core.data import build_pipeline

    concepts = parse_concepts(cfg.concepts)
    names = [c.name for c in concepts]
    if state is not None and (not isinstance(state, dict) or sorted(state.get("concepts", {})) != sorted(names)):
        raise UserError("the checkpoint's data position was saved with other concepts (or none); resume with the same "
                        "concepts (names), or start a new run (experiment_id)")
    state = state or {}
    if concepts[0].repeats is not None:
        counts = [count_samples(c, cfg) for c in concepts]
        shares = [float(c.repeats * n) for c, n in zip(concepts, counts)]
        per_epoch = max(1, round(sum(shares) / (batch_size * world_size)))
        cycle = cfg.concepts_cycle or per_epoch
    else:
        counts = [None] * len(concepts)
        shares = [c.weight for c in concepts]
        cycle = cfg.concepts_cycle or DEFAULT_WEIGHT_CYCLE
    slots = concept_slots(shares, cycle)
    if state.get("slots") is not None and list(state["slots"]) != slots:
        raise UserError(f"the concept mix changed since the checkpoint (slots per cycle {state['slots']} -> {slots}: "
                        f"repeats, weights, sample counts or concepts_cycle); resume with the same data and keys, or "
                        f"start a new run")
    for c, n, s in zip(concepts, counts, slots):
        how = f"repeats {c.repeats} x {n} samples" if c.repeats is not None else f"weight {c.weight:g}"
        log.info("concept '%s' (%s): %s -> %d of every %d micro-batches%s", c.name, c.path, how, s, cycle,
                 ", regularization" if c.regularization else "")
        if s == 0:
            log.warning("concept '%s' gets no micro-batch of a %d-micro-batch cycle: raise its share or concepts_cycle",
                        c.name, cycle)
    saved = state.get("concepts", {})
    pipes = [build_pipeline(c.data_config(cfg), batch_size=batch_size, state=saved.get(c.name), **options)
             for c in concepts]
    return ConceptPipeline(concepts, pipes, slots, cfg.seed, start=int(state.get("micro_steps", 0)))
