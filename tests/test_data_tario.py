"""The streaming tar reader: offsets, long names, and any truncation point."""
import io
import pickle
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from core.data import DataConfig
from core.data.tario import TarTruncated, iter_samples
from tools.photo_shards import make_sample


def _tar(samples, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for key, files in samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES = [(f"dir/{i:03d}", {"txt": f"caption {i}".encode(), "jpg": bytes([i]) * (300 + 97 * i),
                             "json": b"{}"}) for i in range(6)]
SAMPLES.append(("d/" + "x" * 150, {"txt": b"long name", "jpg": b"\xff" * 10}))  # pax path header
DATA = _tar(SAMPLES)


def test_groups_and_offsets_allow_reopening():
    got = list(iter_samples(io.BytesIO(DATA)))
    assert [s.key for s in got] == [k for k, _ in SAMPLES]
    assert [s.files for s in got] == [f for _, f in SAMPLES]
    for s in got:  # reading from a sample's offset starts exactly at that sample
        again = next(iter_samples(io.BytesIO(DATA[s.offset:]), s.offset))
        assert again.key == s.key and again.offset == s.offset and again.files == s.files


def test_gnu_long_names():
    data = _tar(SAMPLES[-1:] + SAMPLES[:1], fmt=tarfile.GNU_FORMAT)
    got = list(iter_samples(io.BytesIO(data)))
    assert [s.key for s in got] == [SAMPLES[-1][0], SAMPLES[0][0]]


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=len(DATA) - 1))
def test_any_truncation_yields_only_complete_samples(cut):
    out, error = [], None
    try:
        for s in iter_samples(io.BytesIO(DATA[:cut])):
            out.append(s)
    except TarTruncated as e:
        error = e
    full = dict(SAMPLES)
    assert all(s.files == full[s.key] for s in out)      # never a partial sample
    assert [s.key for s in out] == [k for k, _ in SAMPLES][:len(out)]
    # a clean end needs the end-of-archive block, which lies after the last sample
    assert error is not None or len(out) == len(SAMPLES)
    if len(out) < len(SAMPLES) and error.key is not None:
        assert error.key == SAMPLES[len(out)][0]          # the reported key is the cut sample


def test_spec_pickles_for_spawned_workers(tmp_path):
    from tools.photo_shards import write_tar
    from core.data import build_pipeline
    p = write_tar(str(tmp_path / "a.tar"), [("k0", make_sample(0, 64, 64))])
    cfg = DataConfig(webdataset_path=p, image_size=64, num_workers=0,
                     dataset_filters=[["aesthetic_score", "lambda s: 0 < s < 10"]],
                     captions_getter=["json", "captions_getter"], multi_aspect_ratio=["1/1", "9/16"])
    pipe = build_pipeline(cfg, 1)
    spec = pickle.loads(pickle.dumps(pipe.spec))
    assert spec.filters[0](5) and spec.table.ratios == pipe.spec.table.ratios
    pipe.close()
