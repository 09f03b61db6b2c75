"""Bucket tables and the resize rule equal the official tables (tests/data/reference)."""
import json
import os

import numpy as np
import pytest

from core.data import BucketTable, DataConfig, DataError, ratio_list, resize_shorter_side
from core.data.buckets import parse_ratio, resized_hw

REF = os.path.join(os.path.dirname(__file__), "data", "reference", "bucketeer_tables.json")


@pytest.fixture(scope="module")
def ref():
    with open(REF) as f:
        return json.load(f)


@pytest.mark.parametrize("size", ["384", "768", "1024"])
def test_tables_match_official(ref, size):
    t = ref["tables"][size]
    table = BucketTable(int(size), ref["ratio_strings"])
    assert table.ratios == t["ratios_after_reverse"]
    assert [list(s) for s in table.sizes] == t["sizes_hw"]
    for (H, W), closest, short in zip(t["probe_hw"], t["closest_size_hw"], t["resize_shorter_side_to"]):
        bucket = table.closest(H, W)
        assert list(bucket) == closest
        assert resize_shorter_side(H, W, bucket) == short
        th, tw = resized_hw(H, W, short)
        assert th >= bucket[0] and tw >= bucket[1]


def test_spec_examples_768():
    table = BucketTable(768, ["1/1", "1/2", "9/16", "16/9", "1/6"])
    got = dict(zip(["1/1", "1/2", "9/16", "16/9", "1/6"], table.sizes))
    assert got == {"1/1": (768, 768), "1/2": (1056, 512), "9/16": (1024, 576),
                   "16/9": (576, 1024), "1/6": (1856, 288)}


def test_ratio_forms_and_reciprocals():
    assert ratio_list(["1/2", 0.5, 2]) == [0.5, 0.5, 2.0]  # 1/0.5 == 2 already present
    assert len(ratio_list(["1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6",
                           "5/6", "9/16"])) == 23
    assert parse_ratio("9/16") == 0.5625
    for bad in ("x", "1/0", -1, True):
        with pytest.raises(DataError, match="multi_aspect_ratio"):
            parse_ratio(bad)


def test_random_ratio_rate():
    table = BucketTable(384, ["1/1", "1/2"], random_ratio=0.05)
    rng = np.random.default_rng(0)
    n = 20000
    # a square image always has the 1/1 bucket unless the 5 % random draw picks another one
    off = sum(table.choose(100, 100, rng) != (384, 384) for _ in range(n))
    # random pick lands on a non-square ratio 2 times out of 3 (ratios 1, 1/2, 2)
    assert abs(off / n - 0.05 * 2 / 3) < 0.01


def test_fixed_size_single_bucket():
    t = DataConfig(webdataset_path="x", image_size=256).bucket_table()
    assert t.buckets == [(256, 256)] and not t.multi
    assert resize_shorter_side(300, 500, (256, 256)) == 256
