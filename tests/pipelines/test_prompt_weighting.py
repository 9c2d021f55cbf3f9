"""A1111 prompt weighting: the encoder's output for a weighted prompt equals the unweighted states times the token
weights, rescaled to each chunk's original mean (computed here independently); weights of 1 change nothing (bit
for bit); BREAK and chunks; embeddings weighted too; the request, PNG parameters and `--prompt-weighting a1111`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.cli import main
from openldm.models.text_encoder import CLIPTextEncoder, encode_prompts, tiny_text_config
from openldm.pipelines import read_png_params, text_to_image
from openldm.pipelines.common import encode_text
from openldm.pipelines.generate import Capabilities, GenerationRequest, Recommended, RequestError
from openldm.tokenizers.clip_bpe import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def enc():
    """Random weights everywhere: a fresh final LayerNorm (weight 1, bias 0) would make every chunk's mean 0."""
    from sd_testing import randomize

    encoder = CLIPTextEncoder(tiny_text_config()).eval()
    randomize(encoder, seed=0)
    return encoder


def _window(tok, words: list[str]) -> tuple[torch.Tensor, list[int]]:
    """ids (1, 77) of the words in one window, and each word's token count."""
    counts = [len(tok.encode(w)) for w in words]
    return tok(" ".join(words)), counts


def _expected(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis written out: z * w, then z * (mean(original) / mean(weighted)), over one chunk (77, D)."""
    scaled = hidden * weights[:, None]
    return scaled * (hidden.mean() / scaled.mean())


@torch.no_grad()
def test_weighted_states_are_scaled_and_brought_back_to_the_mean(tok, enc):
    words = ["a", "red", "house", "under", "stars"]
    ids, counts = _window(tok, words)
    hidden = enc(ids)[0]  # (77, D): the unweighted states, straight from the encoder
    per_word = [1.0, 1.5, 1.0, 1 / 1.1, 1.1 * 1.1]
    weights = torch.ones(77)
    position = 1  # after the start token
    for weight, count in zip(per_word, counts):
        weights[position : position + count] = weight
        position += count
    got = encode_prompts(tok, enc, "a (red:1.5) house [under] ((stars))", weighting="a1111")
    assert got.shape == (1, 77, enc.config.hidden_size)
    torch.testing.assert_close(got[0], _expected(hidden, weights), atol=1e-6, rtol=1e-6)
    assert torch.allclose(got.mean(), hidden.mean(), atol=1e-7)  # the mean is restored
    assert not torch.allclose(got[0], hidden, atol=1e-3)  # and the weights did something


@torch.no_grad()
def test_weights_of_one_give_exactly_the_unweighted_output(tok, enc):
    plain = encode_prompts(tok, enc, ["a red house", "blurry"], chunked=True)
    for prompt in ("a red house", "a (red:1) house", "(a red house:1.0)"):
        got = encode_prompts(tok, enc, [prompt, "blurry"], weighting="a1111")
        assert torch.equal(got, plain), prompt
    assert torch.equal(encode_prompts(tok, enc, "a red house", weighting="none"), enc(tok("a red house")))


@torch.no_grad()
def test_break_and_long_prompts_weight_each_chunk_on_its_own(tok, enc):
    got = encode_prompts(tok, enc, "a red house BREAK (a blue sky:1.3)", weighting="a1111")
    assert got.shape[1] == 2 * 77
    first, second = enc(tok("a red house"))[0], enc(tok("a blue sky"))[0]
    torch.testing.assert_close(got[0, :77], first, atol=0, rtol=0)  # weight 1: untouched
    weights = torch.ones(77)
    weights[1 : 1 + len(tok.encode("a blue sky"))] = 1.3
    torch.testing.assert_close(got[0, 77:], _expected(second, weights), atol=1e-6, rtol=1e-6)
    # a batch pads the shorter prompt with empty chunks (start, end, padding), weight 1
    batch = encode_prompts(tok, enc, ["a red house BREAK a blue sky", "(dog:0.5)"], weighting="a1111")
    assert batch.shape[1] == 2 * 77
    torch.testing.assert_close(batch[1, 77:], enc(tok(""))[0], atol=1e-6, rtol=0)


@torch.no_grad()
def test_embedding_vectors_take_their_pieces_weight(tok, enc):
    vectors = torch.randn(2, enc.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeddings = {"mystyle": vectors}
    got = encode_prompts(tok, enc, "a (mystyle:1.4) cat", weighting="a1111", embeddings=embeddings)
    # the unweighted states with the vectors in place of the name's tokens, built by hand
    a, cat = tok.encode("a"), tok.encode("cat")
    ids = torch.tensor([tok.frame([*a, 0, 0, *cat])])
    token_embeds = enc.embeddings.token_embedding(ids)
    token_embeds[0, 1 + len(a) : 3 + len(a)] = vectors
    hidden = enc(ids, token_embeds=token_embeds)[0]
    weights = torch.ones(77)
    weights[1 + len(a) : 3 + len(a)] = 1.4
    torch.testing.assert_close(got[0], _expected(hidden, weights), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="embedding 'bad' has width 8, the text encoder 32"):
        encode_prompts(tok, enc, "bad", embeddings={"bad": torch.randn(1, 8)})


def test_the_request_checks_the_mode():
    caps = Capabilities(name="m", kind="trained", source="m", prompt=True, negative_prompt=False, class_names=None,
                        num_classes=None, inputs=(), image_to_image=False, inpainting=False, channels=1,
                        size_multiple=8, samplers=("euler",), recommended=Recommended())
    with pytest.raises(RequestError, match="prompt_weighting='a1111'; model 'm' takes none") as e:
        GenerationRequest(prompt="a (b)", prompt_weighting="a1111").resolve(caps)
    assert e.value.field == "prompt_weighting"
    sd = Capabilities(**{**caps.__dict__, "prompt_weightings": ("none", "a1111")})
    with pytest.raises(RequestError, match="prompt_weighting='compel'"):
        GenerationRequest(prompt="x", prompt_weighting="compel").resolve(sd)
    assert GenerationRequest(prompt="x", prompt_weighting="a1111").resolve(sd).prompt_weighting == "a1111"


def test_pipelines_weight_prompts_and_negatives(sd_pair):
    ours, _ = sd_pair
    kwargs = dict(negative_prompt="blurry", steps=3, seed=4, height=32, width=32, progress=False)
    chunked = text_to_image(ours, "a red house", chunked=True, **kwargs)[0]
    weighted = text_to_image(ours, "a red (house:1.0)", prompt_weighting="a1111", **kwargs)[0]
    assert np.array_equal(np.asarray(weighted), np.asarray(chunked))  # weights of 1: the chunked image
    cond, uncond = encode_text(ours, "a red house", "(blurry:1.5)", prompt_weighting="a1111")
    plain_cond, plain_uncond = encode_text(ours, "a red house", "blurry", chunked=True)
    assert torch.equal(cond.context, plain_cond.context)
    hidden = plain_uncond.context[0]
    weights = torch.ones(77)
    weights[1 : 1 + len(ours.tokenizer.encode("blurry"))] = 1.5
    torch.testing.assert_close(uncond.context[0], _expected(hidden, weights), atol=1e-6, rtol=1e-6)


def test_cli_prompt_weighting_a1111_runs_and_is_recorded(tmp_path):
    from sd_testing import tiny_pipeline

    folder, _ = tiny_pipeline(tmp_path)
    common = ["generate", "--model", str(folder), "--prompt", "a (red:1.5) [circle] BREAK blue sky", "--steps",
              "2", "--height", "32", "--width", "32", "--seed", "7", "--quiet"]
    a1111, none = tmp_path / "a1111.png", tmp_path / "none.png"
    assert main(common + ["--prompt-weighting", "a1111", "--out", str(a1111)]) == 0
    assert main(common + ["--out", str(none)]) == 0
    params = read_png_params(a1111)
    assert params.prompt_weighting == "a1111" and "Prompt weighting: a1111" in Image.open(a1111).info["parameters"]
    assert read_png_params(none).prompt_weighting == "none"
    assert not np.array_equal(np.asarray(Image.open(a1111)), np.asarray(Image.open(none)))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(a1111), "--model", str(folder), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(a1111)))
