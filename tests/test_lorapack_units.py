"""Issue 19 units: caption tags (statistics, determinism), regularization share and loss weight,
the loss_weighting key (min-SNR formula, conflicts), Prodigy (state round trip)."""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data.captions import TagOptions, make_caption_getter, make_tag_options
from core.data.errors import DataError
from core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TAGS = [f"t{i}" for i in range(10)]
CAPTION = ", ".join(TAGS)


def _draw(opts: TagOptions, n: int, caption: str = CAPTION) -> list[list[str]]:
    getter = make_caption_getter(tags=opts)
    return [getter({"txt": caption.encode()}, None, np.random.default_rng([5, i])).split(", ") for i in range(n)]


def test_tag_shuffle_keeps_the_first_tags_and_permutes_the_rest_uniformly():
    out = _draw(TagOptions(shuffle=True, keep=2), 2000)
    assert all(t[:2] == ["t0", "t1"] and sorted(t[2:]) == sorted(TAGS[2:]) for t in out)
    # each of the 8 shuffled tags lands first among them about 1/8 of the time
    firsts = np.array([TAGS.index(t[2]) for t in out])
    freq = np.bincount(firsts, minlength=10)[2:] / len(out)
    assert np.all(np.abs(freq - 1 / 8) < 0.03), freq
    assert len({tuple(t) for t in out}) > 1900  # permutations, not a few fixed orders


def test_tag_dropout_rate_and_kept_tags_never_dropped():
    out = _draw(TagOptions(keep=1, dropout=0.3), 3000)
    assert all(t[0] == "t0" for t in out)
    kept = np.mean([len(t) - 1 for t in out]) / 9
    assert abs(kept - 0.7) < 0.02, kept
    assert all(t[1:] == sorted(t[1:], key=TAGS.index) for t in out)  # no shuffle: order kept


def test_tag_draws_are_deterministic_per_sample_and_off_by_default():
    opts = TagOptions(shuffle=True, keep=1, dropout=0.2)
    assert _draw(opts, 50) == _draw(opts, 50)
    assert make_tag_options() is None and make_tag_options(keep=3) is None  # keep alone changes nothing
    plain = make_caption_getter()
    assert plain({"txt": b" a ,b "}, None, np.random.default_rng(0)) == "a ,b"  # untouched without tag keys


def test_tag_keys_in_the_pipeline_and_their_errors(tmp_path):
    """Real shard through the real pipeline: same captions on a rerun, tags shuffled."""
    from core.data import DataConfig, build_pipeline
    from core.data.tarwrite import write_tar
    from tools.photo_shards import jpeg_bytes, photo_variant

    write_tar(str(tmp_path / "s-0000.tar"),
              [(f"{i:03d}", {"jpg": jpeg_bytes(photo_variant(i, 32, 32)), "txt": CAPTION.encode()}) for i in range(4)])
    cfg = DataConfig(webdataset_path=str(tmp_path), image_size=32, num_workers=0, caption_tag_shuffle=True,
                     caption_keep_tags=1)
    runs = [next(iter(build_pipeline(cfg, batch_size=4, num_workers=0)))["captions"] for _ in range(2)]
    assert runs[0] == runs[1] and all(c.startswith("t0, ") for c in runs[0]) and CAPTION not in runs[0]
    for key, value in (("caption_tag_dropout", 1.0), ("caption_keep_tags", -1), ("caption_tag_shuffle", "yes")):
        with pytest.raises(DataError, match=key):
            DataConfig(webdataset_path="x.tar", **{key: value}).validate()


def test_min_snr_weights_equal_the_formula():
    from gdf import make_loss_weight, presets

    log_snr = torch.linspace(-15, 15, 301, dtype=torch.float64)
    snr = log_snr.exp()
    for gamma in (1.0, 5.0):
        w = make_loss_weight("min_snr", gamma)(log_snr)
        torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr)
    torch.testing.assert_close(make_loss_weight("min_snr")(log_snr), (5.0 / snr).clamp(max=1.0))  # default γ 5
    torch.testing.assert_close(make_loss_weight("debiased")(log_snr), 1 / snr.sqrt())
    # p2 by name is the official default weight, bitwise
    assert torch.equal(make_loss_weight("p2")(log_snr), presets.stage_c().loss_weight(log_snr))


def _config(**keys):
    from core.config import load_config
    from train.train_c_lora import LoraConfig

    sets = [f"{k}={v}" for k, v in keys.items()]
    return load_config(LoraConfig, str(ROOT / "configs/training/tiny_c_lora.yaml"), sets, validate_only=True)


def test_loss_weighting_key_conflicts_and_official_key():
    assert _config().loss_weighting is None  # default: the official P2
    assert _config(adaptive_loss_weight="true", loss_weighting="adaptive").adaptive_loss_weight
    with pytest.raises(UserError, match="conflict"):
        _config(adaptive_loss_weight="true", loss_weighting="min_snr")
    with pytest.raises(UserError, match="min_snr_gamma"):
        _config(loss_weighting="p2", min_snr_gamma=3)
    with pytest.raises(UserError, match="min_snr_gamma"):
        _config(loss_weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(UserError, match="loss_weighting"):
        _config(loss_weighting="snr2")


def test_regularization_share_count_and_keys():
    from train.regularization import regularization_count

    assert [regularization_count(0.5, b) for b in (2, 4, 8)] == [1, 2, 4]
    assert regularization_count(0.25, 8) == 2 and regularization_count(0.75, 4) == 3
    assert regularization_count(0.5, 3) == 2 and regularization_count(0.5, 5) == 3  # halves round up
    for share, b in ((0.1, 4), (0.9, 2)):
        with pytest.raises(UserError, match="regularization_share"):
            regularization_count(share, b)
    with pytest.raises(UserError, match="regularization_share"):
        _config(regularization_share=1.0)
    with pytest.raises(UserError, match="regularization_weight"):
        _config(regularization_weight=-1)
    with pytest.raises(UserError, match="cache_path"):
        _config(regularization_webdataset_path="x.tar", cache_path="somewhere", train_tokens="null")


def test_regularization_loss_weight_and_merged_batch():
    """The real DiffusionLoss: the regularization samples' loss is scaled by the weight, the
    batch loss is the mean over all samples; a part of another size is fitted to the main bucket."""
    from gdf import presets
    from train.diffusion_loss import DiffusionLoss
    from train.regularization import REG_KEY, merge_parts, regularized_loss

    gdf = presets.stage_c()
    loss_fn = DiffusionLoss(gdf, defer=lambda fn: fn(), autocast=contextlib.nullcontext)
    main = {"images": torch.rand(3, 3, 8, 8), "captions": ["a", "b", "c"], "keys": ["1", "2", "3"]}
    reg = {"images": torch.rand(1, 3, 8, 12), "captions": ["r"], "keys": ["r1"]}
    merged, n_main = merge_parts({**main, REG_KEY: reg})
    assert n_main == 3 and merged["images"].shape == (4, 3, 8, 8) and merged["captions"] == ["a", "b", "c", "r"]
    assert torch.equal(merged["images"][:3], main["images"])

    def part_loss(batch, generators, sample_weight=None):
        x0 = batch["images"][:, :1]
        return loss_fn(lambda x, r: x * 0.5, x0, generators, sample_weight=sample_weight)

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(4)]

    plain, per = part_loss(merged, gens())
    weights = torch.stack([gdf.diffuse(merged["images"][i:i + 1, :1], generator=g)[-1].view(())
                           for i, g in enumerate(gens())])
    for w in (0.0, 0.5, 2.0):
        loss, metrics = regularized_loss(part_loss, {**main, REG_KEY: reg}, gens(), w)
        expected = (per * weights * torch.tensor([1, 1, 1, w])).mean()
        torch.testing.assert_close(loss, expected)
        assert math.isclose(float(metrics["reg_raw_loss"]), float(per[3]), rel_tol=1e-6)
    torch.testing.assert_close(regularized_loss(part_loss, {**main, REG_KEY: reg}, gens(), 1.0)[0], plain)


def test_mixed_pipeline_share_and_exact_resume(tmp_path):
    """Real shards: every batch has B - k main and k regularization samples, on each of 2 ranks,
    and a resumed pipeline continues both parts exactly."""
    from core.data.tarwrite import write_tar
    from core.training import TrainingConfig
    from tools.photo_shards import jpeg_bytes, photo_variant
    from train.regularization import REG_KEY, build_mixed_pipeline

    for name, n in (("main", 6), ("reg", 5)):
        write_tar(str(tmp_path / name / f"{name}-0000.tar"),
                  [(f"{name}{i:02d}", {"jpg": jpeg_bytes(photo_variant(i, 32, 32)), "txt": f"{name} {i}".encode()})
                   for i in range(n)])
    cfg = TrainingConfig(webdataset_path=str(tmp_path / "main"), image_size=32, num_workers=0, seed=3)
    cfg.regularization_webdataset_path, cfg.regularization_share = str(tmp_path / "reg"), 0.25

    def keys(batch):
        return batch["keys"] + batch[REG_KEY]["keys"]

    for rank in (0, 1):
        options = dict(rank=rank, world_size=2, seed=cfg.seed, num_workers=0, image_dtype="uint8")
        pipe = build_mixed_pipeline(cfg, 4, None, options)
        it = iter(pipe)
        batches = [next(it) for _ in range(3)]
        first = [keys(b) for b in batches]
        moved = pipe.to_device(batches[0], "cpu")  # both parts become float images in [0, 1]
        assert moved["images"].dtype == moved[REG_KEY]["images"].dtype == torch.float32
        assert all(len(k) == 4 and all(x.startswith("main") for x in k[:3]) and k[3].startswith("reg")
                   for k in first)
        state = copy.deepcopy(pipe.state_dict())
        rest = [keys(next(it)) for _ in range(3)]
        pipe.close()
        again = build_mixed_pipeline(cfg, 4, state, options)
        assert [keys(b) for b, _ in zip(again, range(3))] == rest
        again.close()


def test_prodigy_optimizer_and_exact_state_round_trip():
    from core.optim import OptimConfig, build_optimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 3)

    def step(m, opt, i):
        torch.manual_seed(100 + i)
        opt.zero_grad()
        m(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()

    cfg = OptimConfig(optimizer="prodigy")
    a = model()
    opt_a = build_optimizer(a.parameters(), 1.0, cfg)
    assert type(opt_a).__name__ == "Prodigy"
    for i in range(2):
        step(a, opt_a, i)
    saved, weights = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(a.state_dict())
    for i in range(2, 4):
        step(a, opt_a, i)
    b = model()
    b.load_state_dict(weights)
    opt_b = build_optimizer(b.parameters(), 1.0, cfg)
    opt_b.load_state_dict(saved)
    for i in range(2, 4):
        step(b, opt_b, i)
    assert {"d", "d0", "k"} <= set(saved["param_groups"][0])  # its step-size estimate is part of the state
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(UserError, match="use_fsdp"):
        fsdp = OptimConfig(optimizer="prodigy")
        fsdp.use_fsdp = True
        fsdp.validate_optim()


def test_setup_loss_puts_the_chosen_weight_into_the_jobs_gdf():
    from types import SimpleNamespace

    from gdf import AdaptiveLossWeight, ComposedLossWeight, P2LossWeight
    from train.train_c import StageCTrainer

    for keys, kind, registered in (({}, P2LossWeight, []), ({"loss_weighting": "min_snr"}, ComposedLossWeight, []),
                                   ({"adaptive_loss_weight": "true"}, AdaptiveLossWeight, ["loss_weight.pt"]),
                                   ({"loss_weighting": "adaptive"}, AdaptiveLossWeight, ["loss_weight.pt"])):
        names = []
        job = SimpleNamespace(cfg=_config(**keys), defer=None, autocast=None, model_kind=StageCTrainer.model_kind,
                              register_state=lambda name, obj: names.append(name))
        job.make_gdf = lambda: StageCTrainer.make_gdf(job)
        StageCTrainer.setup_loss(job)
        assert type(job.gdf.loss_weight) is kind and names == registered, keys


def test_validate_only_checks_the_share_against_the_launchers_world_size(train_assets, tmp_path, capsys, monkeypatch):
    """The share is of the per-rank micro-batch: --validate-only under WORLD_SIZE refuses what the run would."""
    from tests.test_train_e2e import C_CONFIG, config_args
    from tests.test_train_errors import assert_one_clear_line, run_in_process

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = config_args(C_CONFIG, train_assets, tmp_path, batch_size=4, grad_accum_steps=1,
                       regularization_webdataset_path=str(tmp_path / "class.tar"))
    code, err = run_in_process([*args, "--validate-only"], capsys)
    assert_one_clear_line(code, err, "regularization_share", "per-rank micro-batch of 1")
