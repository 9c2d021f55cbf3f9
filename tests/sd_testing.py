"""Shared test helpers for Stable Diffusion parts: the CLIP vocabulary files built independently of openldm's
reader, random re-initialisation, a tiny random-weight diffusers StableDiffusionPipeline, and comparisons of our
loaded components against it. Imported by tests in several folders (tests/ is on sys.path, see conftest.py)."""
from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
import torch

from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.tokenizers.clip_bpe import END_TOKEN, START_TOKEN

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


# ---- a tiny SD v1-family pipeline written by diffusers ------------------------------------------------------
# Sizes follow SD's conventions that single files cannot state (8 UNet heads, 32 GroupNorm groups, CLIP heads of
# width 64), so the same weights also load from an original-layout file without openldm metadata.

def clip_vocab_files(folder, pad_token: str = END_TOKEN) -> None:
    """vocab.json + merges.txt built from the shipped BPE file the way CLIP builds its vocabulary (as
    tests/tokenizers/test_clip_bpe.py does, independently of openldm's reader)."""
    raw = resources.files("openldm.tokenizers").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [START_TOKEN, END_TOKEN]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
              "pad_token": pad_token, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def random_state(shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random weights with unit-variance fan-in scaling; norm weights near 1; small biases. Every tensor
    differs from its default (diffusers zero-initialises some layers), so a mis-mapped norm or bias cannot hide."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape).uniform_(-1.0, 1.0, generator=g)  # variance 1/3
        if len(shape) > 1:
            t.mul_((3.0 / shape[1:].numel()) ** 0.5)
        else:
            t.mul_(0.1).add_(float("norm" in name and name.endswith("weight")))
        state[name] = t
    return state


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter of ``module`` a :func:`random_state` value."""
    state = random_state({n: p.shape for n, p in module.named_parameters()}, seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(state[name])


def tiny_pipeline(tmp_path, in_channels: int = 4, seed: int = 0, scheduler: str = "PNDMScheduler", **scheduler_kw):
    """A random-weight diffusers StableDiffusionPipeline saved with save_pretrained; returns (folder, pipeline)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=128, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=16)
    text_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                              hidden_act="quick_gelu", projection_dim=128)
    text = transformers.CLIPTextModel(text_config)
    for i, m in enumerate((unet, vae, text)):
        randomize(m, seed + i)
        m.eval()  # as from_pretrained leaves them (dropout off)
    tok_dir = tmp_path / "tok_src"
    clip_vocab_files(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, **scheduler_kw)
    if scheduler in ("PNDMScheduler", "DDIMScheduler"):
        sched_kw.setdefault("set_alpha_to_one", False)  # SD v1.5's scheduler config
    if scheduler == "PNDMScheduler":
        sched_kw["skip_prk_steps"] = True
    sched = getattr(diffusers, scheduler)(**sched_kw)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path / "tiny_sd"
    pipe.save_pretrained(str(folder))
    return folder, pipe


def diffusers_vae(seed: int, widths=(32, 64)):
    """A random diffusers VAE of the tiny pipeline's topology (or with other ``widths``)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * len(widths),
                        up_block_types=("UpDecoderBlock2D",) * len(widths), latent_channels=4, norm_num_groups=32,
                        sample_size=16)
    randomize(vae, seed)
    return vae.eval()


def save_compvis(vae, path) -> None:
    """``vae``'s weights as a CompVis VAE file (vae-ft-mse-840000-ema-pruned's layout)."""
    from safetensors.torch import save_file

    cfg = vae_keys.autoencoder_config_from_diffusers(dict(vae.config))
    state = vae_keys.to_original(vae_keys.from_diffusers(vae.state_dict(), cfg), cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


# ---- comparisons shared with the other io tests --------------------------------------------------------------

def assert_same_weights(sd, pipe) -> None:
    """Every tensor of our modules equals diffusers' after mapping (exactly: no cast happened)."""
    theirs = {
        "unet": unet_keys.to_diffusers(sd.unet.state_dict(), sd.unet.config),
        "vae": vae_keys.to_diffusers(sd.vae.state_dict(), sd.vae.config),
        "text_encoder": sd.text_encoder.state_dict(),  # transformers 4 and 5 name it differently: compare ours
    }
    for name, mapped in theirs.items():
        ref = getattr(pipe, name).state_dict()
        if name == "text_encoder":
            ref = clip_keys.from_diffusers(ref)
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
        assert set(mapped) == set(ref), name
        for key, value in mapped.items():
            assert torch.equal(value.to(ref[key].dtype), ref[key]), f"{name}.{key}"


@torch.no_grad()
def assert_same_outputs(sd, pipe, atol: float = 1e-5) -> None:
    g = torch.Generator().manual_seed(1)
    ids = sd.tokenizer(["a photo of a cat", "an astronaut riding a horse"])
    ref_ids = pipe.tokenizer(["a photo of a cat", "an astronaut riding a horse"], padding="max_length",
                             max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    ctx = sd.text_encoder(ids)
    torch.testing.assert_close(ctx, pipe.text_encoder(ids).last_hidden_state, atol=atol, rtol=0)
    concat_ch = sd.unet.config.concat_channels
    x = torch.randn(2, 4, 8, 8, generator=g)
    concat = torch.randn(2, concat_ch, 8, 8, generator=g) if concat_ch else None
    ours = sd.unet(x, torch.tensor([10.0, 500.0]), context=ctx, concat=concat)
    full = torch.cat([x, concat], 1) if concat_ch else x
    ref = pipe.unet(full, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(sd.vae.encode(img).mode(), pipe.vae.encode(img).latent_dist.mode(), atol=atol, rtol=0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(sd.vae.decode(z), pipe.vae.decode(z).sample, atol=atol, rtol=0)
