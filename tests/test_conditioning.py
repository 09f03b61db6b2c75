"""CLIP conditioning: tiny offline CLIP folders, tokenizer, text/image encoding, offline errors."""
import pytest
import torch

from modules import conditioning as cond
from tools import tiny_clip as tiny


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    text_dir, vision_dir = tiny.write_tiny_clip(root, text_width=32, vision_width=24, projection_dim=16,
                                                vision_projection_dim=8, heads=2, image_size=32, patch_size=8)
    tokenizer = cond.load_tokenizer(str(text_dir), local_files_only=True)
    text_model = cond.load_clip_text(str(text_dir), local_files_only=True)
    vision_model = cond.load_clip_vision(str(vision_dir), local_files_only=True)
    return tokenizer, text_model, vision_model


def test_vocab_layout():
    vocab, merges = tiny.clip_bpe_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_matches_open_clip(tiny_clip):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = tiny_clip[0]
    reference = SimpleTokenizer()
    for text in ["a photo of a cat", "Stable Cascade, trained on LAION: 1024px images.", "über café"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == [49406] + reference.encode(text) + [49407]
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(reference.encode(text)).strip()


def test_tokenizer_padding_and_truncation(tiny_clip):
    tokenizer = tiny_clip[0]
    batch = tokenizer(["a cat", "", "word " * 200], truncation=True, padding="max_length", max_length=77,
                      return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 77) and mask.shape == (3, 77)
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()
    assert mask[0].sum() == 4
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 0).all()
    assert ids[2, 0] == 49406 and ids[2, -1] == 49407 and mask[2].all()
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0


def test_loaded_models_are_frozen(tiny_clip):
    _, text_model, vision_model = tiny_clip
    for model in (text_model, vision_model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert text_model.config.eos_token_id == 49407


def test_encode_text(tiny_clip):
    tokenizer, text_model, _ = tiny_clip
    clip_text, pooled = cond.encode_text(tokenizer, text_model, ["a photo of a cat", ""])
    assert clip_text.shape == (2, 77, 32) and pooled.shape == (2, 1, 16)
    assert torch.isfinite(clip_text).all() and torch.isfinite(pooled).all()
    tokens = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
    out = text_model(**tokens, output_hidden_states=True)
    # clip_text is the pre-final-LayerNorm output, not last_hidden_state
    assert torch.equal(clip_text[:1], out.hidden_states[-1])
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    # pooled = projection of the final-normed hidden state at the (first) EOS position (index 6)
    expected = text_model.text_projection(out.last_hidden_state[0, 6])
    torch.testing.assert_close(pooled[0, 0], expected)
    # the attention mask matters: without it the padding positions differ
    unmasked = text_model(input_ids=tokens["input_ids"], output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(unmasked[0, 10:], clip_text[0, 10:])
    torch.testing.assert_close(unmasked[0, :7], clip_text[0, :7])


def test_encode_text_rejects_bare_string(tiny_clip):
    tokenizer, text_model, _ = tiny_clip
    with pytest.raises(TypeError, match="list of strings"):
        cond.encode_text(tokenizer, text_model, "a cat")


def test_encode_images(tiny_clip):
    vision_model = tiny_clip[2]
    images = torch.rand(2, 3, 40, 56)
    embeds = cond.encode_images_clip(vision_model, images)
    assert embeds.shape == (2, 1, 8)
    pixels = cond.clip_preprocess(images, size=32)
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(embeds[:, 0], vision_model(pixel_values=pixels).image_embeds)


def test_clip_preprocess_normalises_and_validates():
    grey = torch.full((1, 3, 300, 400), 0.5)
    out = cond.clip_preprocess(grey)
    assert out.shape == (1, 3, 224, 224)
    expected = (0.5 - torch.tensor(cond.CLIP_MEAN)) / torch.tensor(cond.CLIP_STD)
    torch.testing.assert_close(out[0, :, 100, 100], expected)
    with pytest.raises(ValueError, match="clip_preprocess"):
        cond.clip_preprocess(torch.rand(3, 32, 32))


def test_bfloat16_text_model(tiny_clip):
    tokenizer = tiny_clip[0]
    text_model = cond.load_clip_text(tiny_clip[1].name_or_path, dtype=torch.bfloat16, local_files_only=True)
    clip_text, pooled = cond.encode_text(tokenizer, text_model, ["a cat"])
    assert clip_text.dtype == torch.bfloat16 and pooled.shape == (1, 1, 16)


def test_missing_hub_model_offline_says_how_to_download():
    with pytest.raises(cond.ClipModelNotFoundError, match=r"huggingface-cli download no-such-org/no-such-clip"):
        cond.load_clip_text("no-such-org/no-such-clip", local_files_only=True)
    with pytest.raises(cond.ClipModelNotFoundError, match="no-such-org/no-such-clip"):
        cond.load_tokenizer("no-such-org/no-such-clip", local_files_only=True)


def test_missing_hub_model_with_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cond.ClipModelNotFoundError, match="huggingface-cli download"):
        cond.load_clip_vision("no-such-org/no-such-clip")


def test_missing_local_folder(tmp_path):
    with pytest.raises(cond.ClipModelNotFoundError, match="does not exist"):
        cond.load_clip_text(str(tmp_path / "nope" / "text"))
    with pytest.raises(cond.ClipModelNotFoundError, match="does not hold"):
        cond.load_clip_text(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(cond.ClipModelNotFoundError, match="is a file"):
        cond.load_clip_vision(str(tmp_path / "model.safetensors"))


def test_cli_writes_tiny_clip(tmp_path):
    assert tiny.main([str(tmp_path / "clip"), "--text-width", "16"]) == 0
    assert (tmp_path / "clip" / "text" / "tokenizer.json").is_file()
    assert (tmp_path / "clip" / "vision" / "config.json").is_file()


def test_write_tiny_clip_validates(tmp_path):
    with pytest.raises(ValueError, match="patch_size"):
        tiny.write_tiny_clip(tmp_path, image_size=30, patch_size=8)
