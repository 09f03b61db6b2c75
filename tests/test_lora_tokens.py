"""train_tokens: new tokens (mean-initialised rows), finetuned existing tokens, errors, EOS pooling."""
from __future__ import annotations

import pytest
import torch

from modules.lora_tokens import TrainTokensError, add_train_tokens, validate_train_tokens


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tools.tiny_clip import write_tiny_clip

    text, _ = write_tiny_clip(tmp_path_factory.mktemp("clip"), text_width=32, projection_dim=32)
    return str(text)


def _load(clip_dir):
    from modules.conditioning import load_clip_text, load_tokenizer

    return load_tokenizer(clip_dir), load_clip_text(clip_dir)


def test_new_token_is_the_mean_of_matching_rows_and_old_rows_are_untouched(clip_dir):
    tok, model = _load(clip_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    vocab = tok.get_vocab()
    dogs = sorted(i for s, i in vocab.items() if s.startswith("dog"))
    result = add_train_tokens(tok, model, [["[fernando]", "^dog"], ["^snail", None]])
    weight = model.get_input_embeddings().weight
    new_id = tok.convert_tokens_to_ids("[fernando]")
    assert new_id == 49408 and weight.shape[0] == 49409
    assert torch.equal(weight[:49408], before)
    torch.testing.assert_close(weight[new_id], before[dogs].mean(0))
    snails = sorted(i for s, i in vocab.items() if s.startswith("snail"))
    assert result.ids == sorted(snails + [new_id]) and not weight.requires_grad
    assert tok("a [fernando]")["input_ids"][2] == new_id


def test_regex_matching_nothing_and_malformed_entries_are_errors(clip_dir):
    tok, model = _load(clip_dir)
    with pytest.raises(TrainTokensError, match="matches no vocabulary entry"):
        add_train_tokens(tok, model, [["[x]", "^zzzqqq_nothing"]])
    with pytest.raises(TrainTokensError, match="matches no vocabulary entry"):
        add_train_tokens(tok, model, [["^zzzqqq_nothing", None]])
    for bad in ([["[x]"]], [[1, None]], "abc", [["snail", "^dog"]], [["(", None]]):
        with pytest.raises(TrainTokensError):
            validate_train_tokens(bad)


def test_retoken_changes_only_the_selected_rows(clip_dir):
    from modules.lora import apply_retoken

    tok, model = _load(clip_dir)
    result = add_train_tokens(tok, model, [["[fernando]", "^dog</w>"], ["^snail", None]])
    emb = model.get_input_embeddings()
    base = emb.weight.detach().clone()
    retoken = apply_retoken(emb, result.ids)
    with torch.no_grad():
        retoken.embeddings.normal_()
    effective = emb.weight
    mask = torch.ones(base.shape[0], dtype=torch.bool)
    mask[result.ids] = False
    assert torch.equal(effective[mask], base[mask])
    assert not torch.equal(effective[result.ids], base[result.ids])


def test_pooling_stays_on_eos_with_a_token_above_eos(clip_dir):
    from modules.conditioning import encode_text

    tok, model = _load(clip_dir)
    # The bigG config uses the legacy eos_token_id 2: HF then pools at argmax(input_ids).
    model.text_model.eos_token_id = 2
    model.config.eos_token_id = 2
    add_train_tokens(tok, model, [["[fernando]", "^dog</w>"]])
    assert model.text_model.eos_token_id == tok.eos_token_id == 49407
    caption = "a photo of [fernando] on the grass"
    ids = tok([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    eos_pos = int((ids["input_ids"][0] == 49407).nonzero()[0])
    with torch.no_grad():
        out = model(**ids)
        _, pooled = encode_text(tok, model, [caption])
        expected = model.text_projection(out.last_hidden_state[0, eos_pos])
        new_pos = int((ids["input_ids"][0] == 49408).nonzero()[0])
        wrong = model.text_projection(out.last_hidden_state[0, new_pos])
    torch.testing.assert_close(pooled[0, 0], expected)
    assert not torch.allclose(pooled[0, 0], wrong)
