"""Tests for modules/filters/ (ControlNet filters) on real photographs shipped with scikit-image."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules import filters as flt
from modules.filters import (
    CannyFilter,
    FilterError,
    IdentityFilter,
    InpaintFilter,
    MissingDependencyError,
    SREffnetFilter,
    SRFilter,
    load_face_model,
    resolve_filter,
)

skimage = pytest.importorskip("skimage")
from skimage import io as skio  # noqa: E402

_DATA = os.path.join(os.path.dirname(skimage.__file__), "data")


def photo(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A real photograph as (1,3,H,W) float in [0,1], optionally resized (antialiased bilinear)."""
    arr = skio.imread(os.path.join(_DATA, name))
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float()[None] / 255.0
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x


PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------- Canny


def test_canny_matches_opencv_and_is_binary_at_working_size():
    x = torch.cat([photo("astronaut.png", (300, 260)), photo("coffee.png", (300, 260))])
    f = CannyFilter()
    assert f.num_channels() == 1
    work = f.edges_at_working_size(x)
    assert work.shape == (2, 1, 224, 224)
    assert set(torch.unique(work).tolist()) <= {0.0, 1.0}
    # Direct OpenCV call on the same uint8 image (x*255 truncated), official thresholds/aperture/L1.
    small = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    arr = (small.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i in range(2):
        ref = cv2.Canny(arr[i], 100, 200, apertureSize=3, L2gradient=False)
        assert np.array_equal(work[i, 0].numpy() * 255, ref.astype(np.float32))
    out, preview = f(x)
    assert out.shape == (2, 1, 300, 260) and preview.shape == (2, 3, 300, 260)
    assert 0.0 <= out.min() and out.max() <= 1.0
    expected = F.interpolate(work, size=(300, 260), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected)
    assert torch.equal(preview, out.expand(-1, 3, -1, -1))


def test_canny_edges_on_gradients_none_on_flat_region():
    x = photo("astronaut.png", (256, 256))
    x[..., :, 128:] = 0.5  # right half flat grey
    out, _ = CannyFilter(resize=None)(x)  # native resolution: exactly binary output
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    left, right = out[..., :, :120], out[..., :, 136:]
    assert left.mean() > 0.03  # the photo has plenty of edges
    assert right.sum() == 0  # nothing on the flat region (away from the seam)
    # The seam itself is an edge wherever the photo differs from grey.
    assert out[..., :, 124:132].sum() > 0


def test_canny_validation():
    with pytest.raises(FilterError, match="resize"):
        CannyFilter(resize=0)
    with pytest.raises(FilterError, match="aperture_size"):
        CannyFilter(aperture_size=4)
    with pytest.raises(FilterError, match=r"\[0,1\]"):
        CannyFilter()(photo("astronaut.png", (64, 64)) * 2 - 1)
    with pytest.raises(FilterError, match=r"\(B,3,H,W\)"):
        CannyFilter()(torch.rand(3, 64, 64))
    with pytest.raises(FilterError, match="unknown call argument"):
        CannyFilter()(torch.rand(1, 3, 64, 64), foo=1)


# ----------------------------------------------------------------------------------------- Inpaint


# The spectral-residual proxy (an explicit option; the network masks: tests/test_saliency.py).
PROXY = "spectral_residual"


def test_inpaint_proxy_mask_coverage_on_real_photos_over_seeds():
    f = InpaintFilter(thresold=[0.04, 0.4], p_outpaint=0.4, saliency=PROXY)
    assert f.num_channels() == 4
    lo, hi = f.coverage
    assert (lo, hi) == (0.05, 0.95)
    x = torch.cat([photo(n, (128, 160)) for n in PHOTOS])
    fracs = []
    for seed in range(5):
        out, preview = f(x, generator=gen(seed))
        assert out.shape == (4, 4, 128, 160) and preview.shape == (4, 3, 128, 160)
        mask = out[:, 3:]
        assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
        m = mask.bool().expand(-1, 3, -1, -1)
        assert torch.all(out[:, :3][m] == 1.0)  # masked pixels are white
        assert torch.equal(out[:, :3][~m], x[~m])  # the rest is the image
        assert torch.equal(preview, out[:, :3])
        frac = mask.mean(dim=(1, 2, 3))
        assert torch.all(frac >= lo) and torch.all(frac <= hi), frac
        fracs += frac.tolist()
    # The masks genuinely vary (not a constant fallback).
    assert max(fracs) - min(fracs) > 0.3


def test_inpaint_proxy_coverage_on_flat_and_extreme_cases():
    f = InpaintFilter(saliency=PROXY)
    flat = torch.full((3, 3, 64, 64), 0.5)
    for seed in range(3):
        frac = f(flat, gen(seed))[0][:, 3].mean(dim=(1, 2))
        assert torch.all((frac >= 0.05) & (frac <= 0.95))
    x = photo("chelsea.png", (96, 128))
    for t in (0.0, 1.0):  # thresholds that give a full / empty raw mask
        for outpaint in (False, True):
            frac = f(x, gen(0), threshold=t, outpaint=outpaint)[0][:, 3].mean().item()
            assert 0.05 <= frac <= 0.95
    tiny = torch.rand(2, 3, 5, 7)
    frac = f(tiny, gen(1))[0][:, 3].mean(dim=(1, 2))
    assert torch.all((frac >= 0.05) & (frac <= 0.95))


def test_inpaint_outpaint_inverts_and_blur_params():
    f = InpaintFilter(saliency=PROXY)
    x = photo("astronaut.png", (192, 192))
    m_in = f(x, gen(0), threshold=0.2, outpaint=False)[0][:, 3].bool()
    m_out = f(x, gen(0), threshold=0.2, outpaint=True)[0][:, 3].bool()
    assert 0.05 < m_in.float().mean() < 0.95
    assert (m_in ^ m_out).float().mean() > 0.99  # complementary up to blur ties at exactly 0.5
    assert f.blur_params(768, 768) == (141, 21.5)  # official kernel and torchvision's default sigma
    assert f.blur_params(512, 640)[0] == 141
    k, _ = f.blur_params(64, 96)
    assert k % 2 == 1 and 3 <= k < 64


def test_inpaint_reproducible_and_explicit_mask():
    f = InpaintFilter(saliency=PROXY)
    x = torch.cat([photo("coffee.png", (128, 128)), photo("rocket.jpg", (128, 128))])
    a, _ = f(x, gen(7))
    b, _ = f(x, gen(7))
    assert torch.equal(a, b)
    outs = [f(x, gen(s))[0] for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[32:64, 16:100] = True
    out, _ = f(x, mask=mask)
    assert torch.equal(out[:, 3].bool(), mask.expand(2, -1, -1))
    assert torch.all(out[:, :3, 32:64, 16:100] == 1.0)
    with pytest.raises(FilterError, match="boolean"):
        f(x, mask=mask.float())
    with pytest.raises(FilterError, match="shape"):
        f(x, mask=mask[:64])


def test_inpaint_threshold_spellings():
    a = InpaintFilter(thresold=[0.1, 0.3], saliency=PROXY)
    b = InpaintFilter(threshold=[0.1, 0.3], saliency=PROXY)
    assert a.threshold == b.threshold == a.thresold == (0.1, 0.3)
    x = photo("chelsea.png", (96, 96))
    assert torch.equal(a(x, gen(3))[0], b(x, gen(3))[0])
    with pytest.raises(FilterError, match="not both"):
        InpaintFilter(thresold=[0.1, 0.3], threshold=[0.1, 0.3])
    with pytest.raises(FilterError, match="thresold"):
        InpaintFilter(thresold=[0.5, 0.1])
    with pytest.raises(FilterError, match="p_outpaint"):
        InpaintFilter(p_outpaint=1.5)
    with pytest.raises(FilterError, match="blur_kernel"):
        InpaintFilter(blur_kernel=140)


# ---------------------------------------------------------------------------------------------- SR


def test_sr_filter_shapes_and_values():
    x = photo("rocket.jpg", (128, 192))
    f = SRFilter(scale_factor=0.25)
    assert f.num_channels() == 3
    out, preview = f(x)
    assert out.shape == x.shape and torch.equal(out, preview)
    # Nearest 4x down then up: constant 4x4 blocks equal to the sampled pixel.
    assert torch.equal(out[..., 4:8, 8:12], x[..., 4:5, 8:9].expand(-1, -1, 4, 4))
    with pytest.raises(FilterError, match="scale_factor"):
        SRFilter(scale_factor=2)


class StubEncoder(torch.nn.Module):
    """Stride-32 conv to 16 channels: the EfficientNetEncoder's interface, with recorded inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 32, stride=32)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.conv(x)


def test_sreffnet_filter_with_encoder():
    enc = StubEncoder().train()
    f = SREffnetFilter(scale_factor=0.5, effnet=enc)
    assert f.num_channels() == 16
    x = photo("astronaut.png", (256, 192))
    latent, preview = f(x)
    assert not enc.training  # always run in eval mode
    half = F.interpolate(x, scale_factor=0.5, mode="nearest")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(enc.seen[0], (half - mean) / std)
    assert latent.shape == (1, 16, 8, 6)  # full-resolution latent grid (H/32, W/32)
    assert torch.allclose(latent, F.interpolate(enc(enc.seen[0]), scale_factor=2, mode="nearest"))
    assert preview.shape == x.shape
    assert torch.equal(preview, F.interpolate(half, size=(256, 192), mode="nearest"))


def test_sreffnet_without_encoder_is_a_clear_error():
    with pytest.raises(FilterError, match="training script must pass the loaded encoder"):
        SREffnetFilter()(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------- Identity


class FakeFaceModel:
    """Test plug-in for IdentityFilter: fixed boxes and embeddings, independent of the image."""

    def __init__(self, boxes=((64, 32, 160, 128),), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.boxes = [np.asarray(b, dtype=np.float32) for b in boxes]
        embs = F.normalize(torch.randn(len(self.boxes), 512, generator=g), dim=1)
        self.embeddings = [e.numpy() for e in embs]
        self.calls: list[tuple] = []

    def detect_and_embed(self, image: np.ndarray):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.calls.append(image.shape)
        return list(zip(self.boxes, self.embeddings))


def test_identity_map_writes_vector_into_box():
    model = FakeFaceModel()
    f = IdentityFilter(max_faces=4, p_drop=0.0, p_full=0.0, face_model=model)
    assert f.num_channels() == 512
    x = torch.cat([photo("astronaut.png", (256, 256))] * 2)
    idmap, preview = f(x, gen(0))
    assert idmap.shape == (2, 512, 8, 8) and preview.shape == (2, 3, 256, 256)
    assert model.calls == [(256, 256, 3)] * 2
    emb = torch.from_numpy(model.embeddings[0])
    # box (64,32,160,128)/32 -> x 2..5, y 1..4
    inside = idmap[:, :, 1:4, 2:5]
    assert torch.equal(inside, emb.view(1, 512, 1, 1).expand(2, -1, 3, 3))
    outside = idmap.clone()
    outside[:, :, 1:4, 2:5] = 0
    assert outside.abs().sum() == 0
    assert 0.0 <= preview.min() and preview.max() <= 1.0
    assert not torch.equal(preview[..., 32:128, 64:160], x[..., 32:128, 64:160] * 0.35)  # tinted box


def test_identity_p_drop_and_p_full():
    x = photo("astronaut.png", (256, 256))
    dropped, _ = IdentityFilter(p_drop=1.0, p_full=0.0, face_model=FakeFaceModel())(x, gen(0))
    assert dropped.abs().sum() == 0
    one = FakeFaceModel()
    full, _ = IdentityFilter(p_drop=0.0, p_full=1.0, face_model=one)(x, gen(0))
    assert torch.equal(full, torch.from_numpy(one.embeddings[0]).view(1, 512, 1, 1).expand(1, -1, 8, 8))
    two = FakeFaceModel(boxes=((0, 0, 64, 64), (128, 128, 224, 224)))
    notfull, _ = IdentityFilter(p_drop=0.0, p_full=1.0, face_model=two)(x, gen(0))
    assert (notfull.abs().sum(1) > 0).float().mean() < 1.0  # p_full only applies to a single face


def test_identity_max_faces_ranking_palette_and_reproducibility():
    x = photo("astronaut.png", (416, 416))
    # 13 small faces (the official j % 13 over 12 colours would fail on the 13th) plus ranking.
    boxes = [(32 * (i % 13), 32 * (i // 13), 32 * (i % 13) + 32, 32 * (i // 13) + 32) for i in range(13)]
    model = FakeFaceModel(boxes=boxes)
    f = IdentityFilter(max_faces=13, p_drop=0.0, p_full=0.0, face_model=model)
    idmap, preview = f(x)
    assert (idmap.abs().sum(1) > 0).sum() == 13
    big = FakeFaceModel(boxes=((0, 0, 32, 32), (160, 160, 256, 256), (380, 0, 416, 40)))
    m2, _ = IdentityFilter(max_faces=1, p_drop=0.0, p_full=0.0, face_model=big)(x)
    assert torch.equal(m2[0, :, 5, 5], torch.from_numpy(big.embeddings[1]))  # the big central face
    assert (m2.abs().sum(1) > 0).sum() == 9
    f = IdentityFilter(p_drop=0.5, p_full=0.5, face_model=FakeFaceModel(boxes=boxes[:4]))
    assert torch.equal(f(x, gen(5))[0], f(x, gen(5))[0])


def test_face_model_loading_and_errors():
    m = load_face_model("tests.test_filters:FakeFaceModel")
    assert isinstance(m, FakeFaceModel)
    f = IdentityFilter(face_model="tests.test_filters:FakeFaceModel", p_drop=0.0, p_full=0.0)
    assert f(photo("chelsea.png", (64, 64)))[0].abs().sum() > 0
    f = IdentityFilter(
        face_model="tests.test_filters:FakeFaceModel",
        face_model_params={"boxes": [(0, 0, 64, 64)], "seed": 3},
        p_drop=0.0,
        p_full=0.0,
    )
    assert f(photo("chelsea.png", (64, 64)))[0][0, :, 0, 0].abs().sum() > 0
    assert f.face_model.boxes[0].tolist() == [0, 0, 64, 64]
    with pytest.raises(FilterError, match="face_model"):
        IdentityFilter(face_model="bad spec")
    with pytest.raises(FilterError, match="detect_and_embed"):
        load_face_model(object())
    with pytest.raises(FilterError, match="insightface"):
        load_face_model("no_colon_here")

    class Bad(FakeFaceModel):
        def detect_and_embed(self, image):
            return [((0, 0, 32, 32), np.zeros(128))]

    with pytest.raises(FilterError, match="512"):
        IdentityFilter(face_model=Bad())(torch.rand(1, 3, 64, 64))
    with pytest.raises(FilterError, match="32x32"):
        IdentityFilter(face_model=FakeFaceModel())(torch.rand(1, 3, 16, 64))


def test_missing_insightface_is_a_clear_error():
    try:
        import insightface  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("insightface is installed")
    f = IdentityFilter()  # the default face model loads lazily
    assert f.num_channels() == 512
    with pytest.raises(MissingDependencyError, match="pip install insightface onnxruntime") as info:
        f(torch.rand(1, 3, 64, 64))
    assert "models/buffalo_l" in str(info.value)


# ----------------------------------------------------------------------------------- resolve_filter


class MyFilter:
    """A user filter (custom filters are named 'package.module:ClassName' in the YAML)."""

    def __init__(self, device="cpu", gain: float = 1.0) -> None:
        self.gain = gain

    def num_channels(self) -> int:
        return 1

    def __call__(self, images, generator=None):
        g = images.mean(1, keepdim=True) * self.gain
        return g, g.expand(-1, 3, -1, -1)


class NoChannels:
    def __call__(self, images, generator=None):
        return images, images


def test_resolve_filter_by_name_and_path():
    f = resolve_filter("CannyFilter", {"resize": 128})
    assert isinstance(f, CannyFilter) and f.resize == 128
    f = resolve_filter("InpaintFilter", {"thresold": [0.04, 0.4], "p_outpaint": 0.4})
    assert f.threshold == (0.04, 0.4)
    f = resolve_filter("IdentityFilter", {"max_faces": 4, "p_drop": 0.0, "p_full": 0.0})
    assert f.num_channels() == 512
    assert isinstance(resolve_filter("modules.filters:SRFilter", {"scale_factor": 0.5}), SRFilter)
    mine = resolve_filter("tests.test_filters:MyFilter", {"gain": 2.0})
    assert isinstance(mine, MyFilter) and mine.gain == 2.0
    assert resolve_filter("SRFilter", None).scale_factor == 0.25
    assert set(flt.FILTERS) == {"CannyFilter", "InpaintFilter", "SREffnetFilter", "SRFilter", "IdentityFilter"}


def test_resolve_filter_errors():
    with pytest.raises(FilterError, match="known filters: CannyFilter, InpaintFilter"):
        resolve_filter("EdgeFilter", {})
    with pytest.raises(FilterError, match=r"unknown parameter 'resise'.*accepted parameters: device, resize"):
        resolve_filter("CannyFilter", {"resise": 224})
    with pytest.raises(FilterError, match="num_channels"):
        resolve_filter("tests.test_filters:NoChannels", {})
    with pytest.raises(FilterError, match="not a class"):
        resolve_filter("tests.test_filters:photo", {})
    with pytest.raises(FilterError, match="cannot import module"):
        resolve_filter("no_such_package.mod:Thing", {})
    with pytest.raises(FilterError, match="has no attribute"):
        resolve_filter("modules.filters:NoSuchFilter", {})
    with pytest.raises(FilterError, match="package.module:ClassName"):
        resolve_filter("os:system; rm", {})
    with pytest.raises(FilterError, match="mapping"):
        resolve_filter("CannyFilter", [224])
