"""CLIP text encoder: size, parity with transformers' CLIPTextModel on identical random weights (tiny and SD v1
configs), clip skip as diffusers applies it, prompt encoding (A1111 chunks), checkpoint key and config maps."""
from __future__ import annotations

import types

import pytest
import torch

from openldm.io.keymaps import clip as keymap
from openldm.models.text_encoder import (
    CLIPTextConfig,
    CLIPTextEncoder,
    encode_prompts,
    sd2_text_config,
    sd15_text_config,
    sd15_text_encoder,
    tiny_text_config,
)
from openldm.registry import MODELS
from openldm.tokenizers.clip_bpe import CLIPTokenizer

transformers = pytest.importorskip("transformers")


def _hf_config(config: CLIPTextConfig):
    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps)


def _pair(config: CLIPTextConfig, seed: int = 0) -> tuple[torch.nn.Module, CLIPTextEncoder]:
    """transformers' CLIPTextModel with random weights, and ours holding the same tensors."""
    torch.manual_seed(seed)
    theirs = transformers.CLIPTextModel(_hf_config(config)).eval()
    with torch.no_grad():  # randomise the LayerNorms too (they start at 1 / 0)
        for name, p in theirs.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = CLIPTextEncoder(config)
    ours.load_state_dict(keymap.from_diffusers(theirs.state_dict()), strict=True, assign=True)
    return theirs, ours.eval()


def _ids(batch: int, pad_id: int = 49407, seed: int = 1) -> torch.Tensor:
    """Framed random prompts of different lengths: start, tokens, end, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad_id)
    for b in range(batch):
        n = [3, 75, 20, 0, 50][b % 5]
        ids[b, 0], ids[b, n + 1] = 49406, 49407
        ids[b, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
    return ids


def _compare(theirs, ours, ids, atol=1e-5):
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
        out = ours(ids)
        torch.testing.assert_close(out, ref.last_hidden_state, atol=atol, rtol=0)
        torch.testing.assert_close(ours.pool(out, ids), ref.pooler_output, atol=atol, rtol=0)
        for skip in range(2, ours.config.num_hidden_layers + 1):  # diffusers' convention: LN(hidden_states[-skip])
            expected = theirs.final_layer_norm(ref.hidden_states[-skip])
            torch.testing.assert_close(ours(ids, clip_skip=skip), expected, atol=atol, rtol=0)


# ---- size and registration -------------------------------------------------------------------------------------

def test_sd15_size_and_registry():
    with torch.device("meta"):
        model = sd15_text_encoder()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    assert MODELS.get("clip_text") is CLIPTextEncoder and CLIPTextEncoder.config_class is CLIPTextConfig
    assert sd15_text_config() == CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=768,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    with torch.device("meta"):
        sd2 = CLIPTextEncoder(sd2_text_config())
        their_sd2 = transformers.CLIPTextModel(_hf_config(sd2_text_config()))
    assert sum(p.numel() for p in sd2.parameters()) == sum(p.numel() for p in their_sd2.parameters())


# ---- parity with transformers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_parity_tiny(act):
    config = CLIPTextConfig(**{**tiny_text_config().__dict__, "hidden_act": act})
    theirs, ours = _pair(config)
    _compare(theirs, ours, _ids(5))
    _compare(theirs, ours, _ids(5, pad_id=0))  # SD 2 pads with 0: the end token is still the argmax
    _compare(theirs, ours, _ids(2)[:, :20])  # shorter sequences use the first position embeddings


def test_parity_sd15():
    theirs, ours = _pair(sd15_text_config())
    ids = _ids(2)
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
        out, skipped = ours(ids), ours(ids, clip_skip=2)
    torch.testing.assert_close(out, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pool(out, ids), ref.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(skipped, theirs.final_layer_norm(ref.hidden_states[-2]), atol=1e-5, rtol=0)


def test_clip_skip_matches_diffusers_encode_prompt(tmp_path):
    """diffusers' StableDiffusionPipeline.encode_prompt run on transformers' model: its clip_skip=1 is our 2.

    diffusers 0.42 reaches the final LayerNorm as ``text_encoder.text_model.final_layer_norm``, which
    transformers 5's CLIPTextModel no longer has; a plain attribute (not a submodule) restores that path here.
    diffusers applies clip skip to the prompt only, never to the negative prompt.
    """
    diffusers = pytest.importorskip("diffusers")
    tokenizer = CLIPTokenizer.from_bpe_file()
    tokenizer.save_folder(tmp_path)
    theirs, ours = _pair(tiny_text_config())
    theirs.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=theirs.final_layer_norm)
    pipe = types.SimpleNamespace(tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tmp_path)),
                                 text_encoder=theirs)
    prompts, negatives = ["a photo of a cat", "an oil painting of a castle, 8k"], ["blurry", ""]
    with torch.no_grad():
        for diffusers_skip, our_skip in ((None, 1), (1, 2), (2, 3)):
            pos, neg = diffusers.StableDiffusionPipeline.encode_prompt(
                pipe, prompts, "cpu", 1, True, negatives, clip_skip=diffusers_skip)
            torch.testing.assert_close(encode_prompts(tokenizer, ours, prompts, clip_skip=our_skip), pos,
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(encode_prompts(tokenizer, ours, negatives), neg, atol=1e-5, rtol=0)


# ---- prompt encoding -------------------------------------------------------------------------------------------

def test_encode_prompts_chunked_concatenates_chunk_encodings():
    tokenizer = CLIPTokenizer.from_bpe_file()
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(tiny_text_config()).eval()
    long = "a castle on a hill, " * 40  # 240 tokens: 4 chunks
    prompts = ["a cat", long, ""]
    with torch.no_grad():
        out = encode_prompts(tokenizer, encoder, prompts, chunked=True, clip_skip=2)
        assert out.shape == (3, 4 * 77, 32)
        for b, prompt in enumerate(prompts):
            chunks = tokenizer.chunk(prompt, min_chunks=4)
            expected = encoder(chunks, clip_skip=2).reshape(4 * 77, 32)
            torch.testing.assert_close(out[b], expected, atol=1e-6, rtol=0)
        empty = encoder(tokenizer(""), clip_skip=2)[0]
        torch.testing.assert_close(out[0, 77:154], empty)  # short prompts are padded with empty chunks
        assert encode_prompts(tokenizer, encoder, "a cat").shape == (1, 77, 32)
        torch.testing.assert_close(encode_prompts(tokenizer, encoder, "a cat", chunked=True),
                                   encode_prompts(tokenizer, encoder, ["a cat"]))
        with pytest.warns(UserWarning, match="dropped"):
            assert encode_prompts(tokenizer, encoder, [long]).shape == (1, 77, 32)


def test_dtype_and_errors():
    encoder = CLIPTextEncoder(tiny_text_config()).to(torch.bfloat16)
    out = encoder(_ids(2))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 77, 32) and encoder.pool(out, _ids(2)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"clip_skip=0; must be in \[1, 3\]"):
        encoder(_ids(1), clip_skip=0)
    with pytest.raises(ValueError, match=r"clip_skip=4; must be in \[1, 3\]"):
        encoder(_ids(1), clip_skip=4)
    with pytest.raises(ValueError, match=r"input_ids of shape \(1, 78\)"):
        encoder(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_act='relu'; choose one of: quick_gelu, gelu"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_size=100 must be a positive multiple of num_attention_heads=12"):
        CLIPTextConfig(hidden_size=100)


# ---- checkpoint layouts ----------------------------------------------------------------------------------------

def test_keymaps_original_and_transformers_layouts():
    theirs, ours = _pair(tiny_text_config())
    state = ours.state_dict()
    # SD v1 single file: prefix + text_model., a position_ids buffer, other models' keys
    original = keymap.to_original(state)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in original
    noisy = {**original, "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "model.diffusion_model.out.0.weight": torch.ones(1),
             "first_stage_model.decoder.conv_in.bias": torch.ones(1)}
    assert keymap.from_original(noisy).keys() == state.keys()
    early = {k.replace("transformer.text_model.", "transformer."): v for k, v in original.items()}  # old fine-tunes
    assert keymap.from_original(early).keys() == state.keys()
    # diffusers text_encoder/: transformers 4 names (text_model.*) and transformers 5 names
    v4 = keymap.to_diffusers(state)
    assert all(k.startswith("text_model.") for k in v4)
    assert keymap.from_diffusers(v4).keys() == state.keys()
    assert keymap.from_diffusers(theirs.state_dict()).keys() == state.keys()
    for key, value in keymap.from_original(noisy).items():
        assert value is state[key]  # renamed, never copied


def test_transformers_config_and_folder_round_trip(tmp_path):
    from safetensors.torch import save_file

    config = tiny_text_config()
    theirs, ours = _pair(config)
    assert keymap.clip_config_from_diffusers(theirs.config.to_dict()) == config
    assert keymap.clip_config_from_diffusers({"model_type": "clip", "text_config": theirs.config.to_dict()}) == config
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        keymap.clip_config_from_diffusers({**theirs.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    # a folder as our converter would write it loads in transformers and gives the same outputs
    import json
    (tmp_path / "config.json").write_text(json.dumps(keymap.clip_config_to_diffusers(config)))
    save_file({k: v.contiguous() for k, v in keymap.to_diffusers(ours.state_dict()).items()},
              str(tmp_path / "model.safetensors"))
    loaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, ours(ids), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded(ids).pooler_output, ours.pool(ours(ids), ids), atol=1e-6, rtol=0)


def test_open_clip_keymap_matches_diffusers():
    """SD 2 single files store OpenCLIP names; diffusers' converter is the oracle."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            hidden_act="gelu", vocab_size=100, max_position_embeddings=77)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    p = "cond_stage_model.model."
    ckpt = {p + "token_embedding.weight": r(100, 32), p + "positional_embedding": r(77, 32),
            p + "ln_final.weight": r(32), p + "ln_final.bias": r(32), p + "text_projection": r(32, 32),
            p + "logit_scale": r(())}
    for i in range(3):  # one block more than used, as SD 2 files hold 24 for 23
        b = f"{p}transformer.resblocks.{i}."
        ckpt.update({b + "attn.in_proj_weight": r(96, 32), b + "attn.in_proj_bias": r(96),
                     b + "attn.out_proj.weight": r(32, 32), b + "attn.out_proj.bias": r(32),
                     b + "ln_1.weight": r(32), b + "ln_1.bias": r(32), b + "ln_2.weight": r(32), b + "ln_2.bias": r(32),
                     b + "mlp.c_fc.weight": r(64, 32), b + "mlp.c_fc.bias": r(64),
                     b + "mlp.c_proj.weight": r(32, 64), b + "mlp.c_proj.bias": r(32)})
    ours = keymap.from_open_clip(ckpt, num_layers=2)
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    model.load_state_dict(ours, strict=True, assign=True)
    reference = convert_open_clip_checkpoint(types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=32)), ckpt)
    reference = {k: v for k, v in keymap.from_diffusers(reference).items() if k in ours}  # it keeps block 2
    assert reference.keys() == ours.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
