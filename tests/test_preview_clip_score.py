"""The preview CLIP score against a hand computation with a tiny CLIP (tools/tiny_clip.py)."""
import pytest
import torch

from core.errors import UserError
from train.preview_clip_score import ClipScorer, PreviewClipScoreConfig, clip_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(score_clip):
    """The session's tiny CLIP-score model (tests/conftest.py)."""
    return score_clip


def test_clip_score_by_hand(tiny_clip):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red car", "a cat on a sofa", "an astronaut"]
    got = ClipScorer(str(tiny_clip))(images, prompts)
    # by hand, with the plain transformers classes: CLIP preprocessing (shorter side 32 bicubic, centre crop,
    # CLIP mean/std), projected embeddings, 100 * max(cosine, 0)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = TF.center_crop(TF.resize(images, 32, interpolation=InterpolationMode.BICUBIC, antialias=True), [32, 32])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip / "vision").eval()
    text = CLIPTextModelWithProjection.from_pretrained(tiny_clip / "text").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip / "text")
    with torch.no_grad():
        img = vision(pixel_values=(x - mean) / std).image_embeds
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        txt = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).text_embeds
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    expected = 100 * cos.clamp(min=0)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)


def test_score_formula():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    i = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(clip_scores(t, i), torch.tensor([100.0, 0.0, 100 / 2 ** 0.5]))


@pytest.mark.parametrize("keys, message", [
    ({"preview_clip_score": True}, "needs 'preview_clip_model'"),
    ({"preview_clip_score": True, "preview_clip_model": "/nowhere/clip"}, "folder not found: /nowhere/clip"),
    ({"preview_clip_model": "x"}, "applies with preview_clip_score: true only"),
])
def test_validation(keys, message):
    with pytest.raises(UserError, match=message):
        PreviewClipScoreConfig(**keys).validate_preview_clip_score()
