"""Concepts: the mix over a cycle is exact, repeats count samples, the sequence resumes exactly and
is the same on every rank; per-concept caption keys and validation."""
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from core.data import DataConfig
from core.errors import UserError
from train.concepts import (CONCEPT_KEY, CONCEPT_REG_KEY, ConceptsConfig, build_concept_pipeline, concept_at,
                            concept_slots, parse_concepts)


@dataclass
class Cfg(DataConfig, ConceptsConfig):
    seed: int = 3


def folder(path, n, caption, color):
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), color + i, np.uint8)).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(f"{caption} {i}, extra tag")
        (path / f"{i:03d}.json").write_text(json.dumps({"caption": f"json caption {i}"}))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return {"subject": folder(tmp_path / "subject", 2, "ohwx dog", 10),
            "dogs": folder(tmp_path / "dogs", 4, "a dog", 100)}


def cfg(data, **kw):
    concepts = [{"name": "subject", "path": data["subject"], "repeats": 3},
                {"name": "dogs", "path": data["dogs"], "repeats": 1, "regularization": True}]
    return Cfg(image_size=32, num_workers=0, concepts=concepts, **kw)


def take(pipe, n):
    return [(b[CONCEPT_KEY], b[CONCEPT_REG_KEY], tuple(b["keys"])) for b in (next(pipe) for _ in range(n))]


def test_slots_and_order_are_exact_and_deterministic():
    assert concept_slots([6.0, 4.0], 10) == [6, 4]
    assert concept_slots([1.0, 1.0, 1.0], 10) == [4, 3, 3]  # largest remainder, ties to the first
    seq = [concept_at(k, [6, 4], seed=1) for k in range(30)]
    for c in range(3):  # every cycle holds exactly the slots
        assert Counter(seq[10 * c:10 * c + 10]) == {0: 6, 1: 4}
    assert seq == [concept_at(k, [6, 4], seed=1) for k in range(30)]
    assert seq != [concept_at(k, [6, 4], seed=2) for k in range(30)]  # shuffled per seed and cycle


def test_repeats_mix_over_an_epoch_and_exact_resume(data):
    c = cfg(data)
    pipe = build_concept_pipeline(c, batch_size=1, world_size=1, state=None, options={"num_workers": 0})
    # repeats 3 x 2 samples vs 1 x 4 samples: 6 of every 10 micro-batches from the subject
    first = take(pipe, 7)
    state = pipe.state_dict()
    rest = take(pipe, 13)
    pipe.close()
    epoch = first + rest
    assert Counter(name for name, _, _ in epoch[:10]) == {"subject": 6, "dogs": 4}
    assert Counter(name for name, _, _ in epoch[10:]) == {"subject": 6, "dogs": 4}
    assert all(reg == (name == "dogs") for name, reg, _ in epoch)
    # every subject sample 3x per cycle pair of epochs of its own pipeline: both samples are seen
    assert {keys for name, _, keys in epoch if name == "subject"} == {("000",), ("001",)}
    resumed = build_concept_pipeline(c, batch_size=1, world_size=1, state=state, options={"num_workers": 0})
    assert take(resumed, 13) == rest  # same concepts AND same samples
    resumed.close()


def test_every_rank_takes_the_same_concept(data):
    c = cfg(data, concepts_cycle=5)
    pipes = [build_concept_pipeline(c, batch_size=1, world_size=2, state=None,
                                    options={"num_workers": 0, "rank": r, "world_size": 2}) for r in range(2)]
    seqs = [[name for name, _, _ in take(p, 10)] for p in pipes]
    for p in pipes:
        p.close()
    assert seqs[0] == seqs[1] and Counter(seqs[0][:5]) == {"subject": 3, "dogs": 2}


def test_weights_and_per_concept_caption_keys(data):
    concepts = [{"name": "a", "path": data["subject"], "weight": 1.0, "caption_key": "json:caption"},
                {"name": "b", "path": data["dogs"], "weight": 3.0}]
    pipe = build_concept_pipeline(Cfg(image_size=32, num_workers=0, concepts=concepts, concepts_cycle=8),
                                  batch_size=1, world_size=1, state=None, options={"num_workers": 0})
    got = [next(pipe) for _ in range(8)]
    pipe.close()
    assert Counter(b[CONCEPT_KEY] for b in got) == {"a": 2, "b": 6}
    assert all(b["captions"][0].startswith("json caption") for b in got if b[CONCEPT_KEY] == "a")  # its own key
    assert all(b["captions"][0].endswith("extra tag") for b in got if b[CONCEPT_KEY] == "b")  # the run's: .txt


def test_resume_with_other_concepts_is_refused(data):
    c = cfg(data)
    pipe = build_concept_pipeline(c, batch_size=1, world_size=1, state=None, options={"num_workers": 0})
    state = pipe.state_dict()
    pipe.close()
    other = cfg(data)
    other.concepts[0]["repeats"] = 5
    with pytest.raises(UserError, match="the concept mix changed"):
        build_concept_pipeline(other, batch_size=1, world_size=1, state=state, options={"num_workers": 0})


@pytest.mark.parametrize("entries, message", [
    ([], "non-empty list"),
    ([{"repeats": 1}], "concepts\\[0\\]'.*has no 'path'"),
    ([{"path": "x", "repeats": 1, "weight": 2.0}], "exactly one of 'repeats'"),
    ([{"path": "x", "repeats": 0}], "concepts\\[0\\]'.repeats: expected an integer >= 1"),
    ([{"path": "x", "weight": -1}], "weight: expected a finite number > 0"),
    ([{"path": "x", "repeats": 1, "colour": "red"}], "unknown key\\(s\\) colour"),
    ([{"path": "x", "repeats": 1}, {"path": "y", "weight": 1.0}], "not both"),
    ([{"path": "x", "repeats": 1, "name": "a"}, {"path": "y", "repeats": 1, "name": "a"}], "names must differ"),
    ([{"path": "x", "repeats": 1, "regularization": "yes"}], "regularization: expected true or false"),
    ([{"path": "x", "repeats": 1, "caption_tag_dropout": 2.0}], "concepts\\[0\\]'.*caption_tag_dropout"),
])
def test_validation(entries, message):
    with pytest.raises(UserError, match=message):
        parse_concepts(entries)


def test_concepts_replace_webdataset_path():
    with pytest.raises(UserError, match="'concepts' and 'webdataset_path' do not combine"):
        Cfg(webdataset_path="x", concepts=[{"path": "y", "repeats": 1}]).validate_concepts()


def test_the_run_lists_each_concept_as_its_data(tmp_path):
    """--validate-only and the start-of-run data listing see the concepts' paths, not a missing
    webdataset_path (a concepts run used to fail with a TypeError before its first update)."""
    from types import SimpleNamespace

    from core.discovery import discover_data
    from train.train_c import StageCTrainer

    cfg = SimpleNamespace(webdataset_path=None, validation_webdataset_path=None, cache_path=None,
                          regularization_webdataset_path=None,
                          concepts=[{"path": "a/", "repeats": 2}, {"path": "b.tar", "weight": None, "repeats": 1}])
    assert StageCTrainer.data_sources(cfg) == {"concepts[0].path": "a/", "concepts[1].path": "b.tar"}
    assert discover_data(cfg) is None
