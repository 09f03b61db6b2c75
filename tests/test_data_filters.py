"""dataset_filters parsing (no eval) and captions_getter forms."""
import json

import numpy as np
import pytest

from core.data import DataConfig, DataError, make_caption_getter, parse_filter, parse_filters
from core.data.captions import MissingCaption


@pytest.mark.parametrize("text,value,expected", [
    ("lambda s: s > 4.5", 5, True),
    ("lambda s: s > 4.5", 4.5, False),
    ("lambda s: s >= 768", 768, True),
    ("lambda s: 0 < s <= 1", 0.5, True),
    ("lambda s: 0 < s <= 1", 1.5, False),
    ("lambda x: x in ('a', 'b')", "b", True),
    ("lambda x: x not in ['a', 'b']", "b", False),
    ("lambda s: s > 4.5 and s < 6 or s == 10", 10, True),
    ("lambda s: not s < 3", 2, False),
    ("lambda s: s * 2 + 1 > 10", 5, True),
    ("lambda s: s % 2 == 0", 4, True),
    ("lambda s: -s < -3", 4, True),
    ("lambda s: s is not None", None, False),
    ("lambda w: w == 'photo'", "photo", True),
])
def test_lambda_accepted(text, value, expected):
    rule = parse_filter(["k", text])
    assert rule(value) is expected


@pytest.mark.parametrize("text", [
    "lambda s: __import__('os').system('true')",
    "lambda s: s.real > 1",
    "lambda s: len(s) > 1",
    "lambda s: s[0] > 1",
    "lambda s: s ** 99 > 1",
    "lambda s: (lambda: 1)() == 1",
    "lambda s, t: s > t",
    "lambda s=1: s > 0",
    "lambda *a: 1 > 0",
    "lambda s: t > 1",
    "lambda s: s",
    "lambda s: s + 1",
    "lambda s: [x for x in s] == []",
    "lambda s: s > (1, s)",
    "s > 4.5",
    "lambda s: s >",
    "lambda s: s if s else 0",
])
def test_lambda_rejected_quotes_text(text):
    with pytest.raises(DataError) as e:
        parse_filter(["aesthetic_score", text], 3)
    assert "dataset_filters[3]" in str(e.value)
    assert repr(text.strip()) in str(e.value)


def test_plain_form():
    assert parse_filter(["w", ">=", 768])(768)
    assert not parse_filter(["w", "<", 10])(10)
    assert parse_filter(["tag", "in", ["a", "b"]])("a")
    assert parse_filter(["tag", "not in", ["a"]])("b")
    with pytest.raises(DataError, match="operator"):
        parse_filter(["w", "=>", 1])
    with pytest.raises(DataError, match="list"):
        parse_filter(["w", "in", 3])
    with pytest.raises(DataError, match=r"dataset_filters\[0\]"):
        parse_filter("nope")


def test_filters_pickle():
    import pickle
    rules = parse_filters([["a", "lambda s: s > 4.5"], ["b", "<", 0.01]])
    again = pickle.loads(pickle.dumps(rules))
    assert again[0](5) and not again[1](0.5)


def test_captions_getters():
    rng = np.random.default_rng(0)
    files = {"txt": "  hello  ".encode(), "json": json.dumps({"caption": "from json"}).encode()}
    meta = json.loads(files["json"])
    assert make_caption_getter()(files, meta, rng) == "hello"
    assert make_caption_getter(["txt", "identity"])(files, meta, rng) == "hello"
    assert make_caption_getter(caption_key="json:caption")(files, meta, rng) == "from json"
    with pytest.raises(MissingCaption):
        make_caption_getter(caption_key="json:other")(files, meta, rng)
    with pytest.raises(MissingCaption):
        make_caption_getter()({"jpg": b""}, None, rng)
    for bad in (["txt", "lambda x: x"], ["txt"], "txt", ["png", "captions_getter"]):
        with pytest.raises(DataError, match="captions_getter"):
            make_caption_getter(bad)


def test_official_json_rule_rate():
    g = make_caption_getter(["json", "captions_getter"])
    meta = {"caption": "new", "old_caption": json.dumps({"og_caption": "orig"})}
    files = {"json": json.dumps(meta).encode()}
    picks = [g(files, meta, np.random.default_rng([i, 2])) for i in range(4000)]
    rate = picks.count("orig") / len(picks)
    assert set(picks) == {"new", "orig"} and 0.035 < rate < 0.065
    meta2 = {"caption": "new", "old_caption": ""}
    assert all(g({"json": b"{}"}, meta2, np.random.default_rng(i)) == "new" for i in range(200))


@pytest.mark.parametrize("key,value", [
    ("webdataset_path", None), ("image_size", 10), ("crop", "saliency"),
    ("bucket_random_ratio", -0.1), ("shuffle_buffer", 0), ("num_workers", -1), ("strict", "yes"),
    ("multi_aspect_ratio", ["1/0"]), ("dataset_filters", [["a", "lambda s: s.x"]]),
    ("captions_getter", ["txt", "eval"]), ("report_every", 0), ("caption_key", "json"),
])
def test_config_validate_names_key(key, value):
    cfg = DataConfig(webdataset_path="x.tar")
    setattr(cfg, key, value)
    with pytest.raises(DataError, match=key):
        cfg.validate()


def test_config_from_dict_ignores_other_keys():
    cfg = DataConfig.from_dict({"webdataset_path": ["a.tar"], "lr": 1e-4, "image_size": 384,
                                "multi_aspect_ratio": ["1/1", "1/2"]})
    assert cfg.image_size == 384 and cfg.webdataset_path == ["a.tar"]
