"""Autoencoder key maps and configs against diffusers: identical outputs on identical random weights, the
original CompVis layout checked by diffusers' own single-file converter, and strictness."""
from __future__ import annotations

import pytest
import torch

from openldm.io.keymaps import autoencoder as keymap
from openldm.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    VQAutoencoder,
    VQModelConfig,
    sd_autoencoder_kl,
    tiny_autoencoder_kl,
    tiny_vq,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from diffusers import VQModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY_A = tiny_autoencoder_kl()  # f = 4, one ResBlock per level, a skip conv where the width changes
TINY_B = AutoencoderKLConfig(  # f = 2, two ResBlocks, other image and latent channel counts
    in_channels=1, out_channels=2, channels=32, channel_mult=(1, 3), num_res_blocks=2, z_channels=3, scaling_factor=0.5,
)

from sd_testing import random_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The config.json of runwayml/stable-diffusion-v1-5's "vae" folder, as published.
SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def build_pair(cfg: AutoencoderKLConfig | VQModelConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Diffusers' model on random weights, and ours loaded from its state dict through the key map. Both are
    built on the meta device and take tensors by assignment: no initialisation cost for the SD topology."""
    kl = isinstance(cfg, AutoencoderKLConfig)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg) if kl else VQAutoencoder(cfg)
        ref = (DiffusersAutoencoderKL if kl else VQModel)(**keymap.autoencoder_config_to_diffusers(cfg))
    ref.load_state_dict(random_state({k: v.shape for k, v in ref.state_dict().items()}), strict=True, assign=True)
    ours.load_state_dict(keymap.from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    return ours.eval(), ref.eval()


def meta_state(cfg: AutoencoderKLConfig | VQModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict for ``cfg`` as meta tensors: keys and shapes, no memory."""
    with torch.device("meta"):
        return (AutoencoderKL(cfg) if isinstance(cfg, AutoencoderKLConfig) else VQAutoencoder(cfg)).state_dict()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- outputs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,size", [(sd_autoencoder_kl(), 64), (TINY_A, 32), (TINY_B, 24)], ids=["sd", "tiny-a", "tiny-b"])
def test_kl_encode_and_decode_match_diffusers(cfg: AutoencoderKLConfig, size: int):
    """Posterior mean and log-variance, and decoding, on 1 x C x size x size (SD: 83,653,863 random weights)."""
    ours, ref = build_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, cfg.in_channels, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        z = torch.randn(post.mean.shape, generator=g)
        out, expected = ours.decode(z), ref.decode(z).sample
    assert ref_post.mean.std() > 0.1 and expected.std() > 0.1
    assert rel(post.mean, ref_post.mean) < 1e-4
    assert rel(post.logvar, ref_post.logvar) < 1e-4
    assert rel(out, expected) < 1e-4


def test_vq_encode_and_decode_match_diffusers():
    cfg = tiny_vq()
    ours, ref = build_pair(cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h, ref_h = ours.encode(x), ref.encode(x).latents
        out, expected = ours.decode(h), ref.decode(ref_h).sample  # both quantise first
    assert rel(h, ref_h) < 1e-4
    assert rel(out, expected) < 1e-4


# ---- the original layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [sd_autoencoder_kl(), TINY_A, TINY_B], ids=["sd", "tiny-a", "tiny-b"])
def test_original_layout_agrees_with_diffusers_single_file_converter(cfg: AutoencoderKLConfig):
    """ours -> original (our map) -> diffusers (diffusers' converter) gives exactly ours -> diffusers (our map)."""
    state = random_state({k: v.shape for k, v in meta_state(cfg).items()})
    original = keymap.to_original(state, cfg)
    attention = [k for k in original if ".attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))]
    assert len(attention) == 8 and all(original[k].dim() == 4 for k in attention)  # conv1x1 in the original
    converted = convert_ldm_vae_checkpoint(
        {keymap.ORIGINAL_PREFIX + k: v for k, v in original.items()}, keymap.autoencoder_config_to_diffusers(cfg)
    )
    direct = keymap.to_diffusers(state, cfg)
    assert sorted(converted) == sorted(direct)
    assert all(torch.equal(converted[k], direct[k]) for k in direct)
    back = keymap.from_original(original, cfg)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_original_decoder_levels_are_numbered_by_resolution():
    original = keymap.to_original(meta_state(TINY_A), TINY_A)
    # our decoder.up.0 (lowest resolution, computed first) is CompVis's up.2; its upsampler comes along
    assert "decoder.up.2.block.0.conv1.weight" in original and "decoder.up.2.upsample.conv.weight" in original
    assert "decoder.up.0.upsample.conv.weight" not in original  # the full-resolution level has none
    assert "encoder.down.1.block.0.nin_shortcut.weight" in original


def test_vq_round_trips_and_fresh_statistics():
    cfg = tiny_vq(ema=True)
    model = VQAutoencoder(cfg)
    state = model.state_dict()
    for to, frm in [(keymap.to_original, keymap.from_original), (keymap.to_diffusers, keymap.from_diffusers)]:
        exported = to(state, cfg)
        assert "quantize.embedding.weight" in exported and not any("cluster_size" in k or "embed_sum" in k for k in exported)
        back = frm(exported, cfg)
        assert sorted(back) == sorted(state)
        assert torch.equal(back["quantizer.codebook"], state["quantizer.codebook"])
        assert torch.equal(back["quantizer.cluster_size"], torch.ones(cfg.num_embeddings))
        assert torch.equal(back["quantizer.embed_sum"], state["quantizer.codebook"])
        VQAutoencoder(cfg).load_state_dict(back, strict=True)


# ---- strictness --------------------------------------------------------------------------------------------
def test_unmapped_and_missing_keys_are_listed():
    state = {k: torch.zeros(s) for k, s in ((k, v.shape) for k, v in meta_state(TINY_A).items())}
    original = keymap.to_original(state, TINY_A)
    extra = dict(original, **{"encoder.mid.attn_2.q.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"1 unmapped key\(s\) \['encoder.mid.attn_2.q.weight'\]"):
        keymap.from_original(extra, TINY_A)
    short = {k: v for k, v in original.items() if k != "decoder.up.1.upsample.conv.bias"}
    with pytest.raises(KeyError, match=r"1 missing key\(s\) \['decoder.up.1.upsample.conv.bias'\]"):
        keymap.from_original(short, TINY_A)
    with pytest.raises(KeyError, match="unmapped"):
        keymap.to_diffusers(dict(state, bogus=torch.zeros(1)), TINY_A)
    with pytest.raises(KeyError, match="missing"):
        keymap.from_diffusers({}, TINY_A)
    # The LPIPS / discriminator weights of standalone first-stage files are skipped by default, nothing else.
    with_loss = dict(original, **{"loss.discriminator.main.0.weight": torch.zeros(1)})
    assert sorted(keymap.from_original(with_loss, TINY_A)) == sorted(state)
    with pytest.raises(KeyError, match="loss.discriminator"):
        keymap.from_original(with_loss, TINY_A, ignore_prefixes=())
    # A tensor of the wrong shape names both keys.
    bad = dict(original, **{"encoder.mid.attn_1.q.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(ValueError, match=r"encoder.mid.attn_1.q.weight has shape \(64, 64, 3, 3\).*encoder.mid.attn.attn.to_q.weight"):
        keymap.from_original(bad, TINY_A)


# ---- configs -----------------------------------------------------------------------------------------------
def test_sd15_diffusers_config_gives_the_sd_preset():
    assert keymap.autoencoder_config_from_diffusers(SD15_VAE_JSON) == sd_autoencoder_kl()


@pytest.mark.parametrize("cfg", [sd_autoencoder_kl(), TINY_A, TINY_B, tiny_vq(), tiny_vq(embed_dim=8, z_channels=3)],
                         ids=["sd", "tiny-a", "tiny-b", "vq", "vq-embed"])
def test_config_round_trips_through_diffusers_and_original_shapes(cfg):
    assert keymap.autoencoder_config_from_diffusers(keymap.autoencoder_config_to_diffusers(cfg)) == cfg
    original = keymap.to_original(meta_state(cfg), cfg)
    derived = keymap.autoencoder_config_from_original(original, scaling_factor=cfg.scaling_factor)
    assert derived == cfg


def test_configs_diffusers_cannot_express_are_rejected():
    with pytest.raises(ValueError, match="first multiplier must be 1"):
        keymap.autoencoder_config_to_diffusers(AutoencoderKLConfig(channels=32, channel_mult=(2, 4)))
    with pytest.raises(ValueError, match="multiple of 32"):
        keymap.autoencoder_config_to_diffusers(AutoencoderKLConfig(channels=16, channel_mult=(1, 2)))
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        keymap.autoencoder_config_from_diffusers(dict(SD15_VAE_JSON, down_block_types=["AttnDownEncoderBlock2D"] * 4))
    with pytest.raises(ValueError, match="norm_num_groups=16"):
        keymap.autoencoder_config_from_diffusers(dict(SD15_VAE_JSON, norm_num_groups=16))
    with pytest.raises(ValueError, match=r"unknown diffusers autoencoder config key\(s\) \['mystery'\]"):
        keymap.autoencoder_config_from_diffusers(dict(SD15_VAE_JSON, mystery=1))
    with pytest.raises(ValueError, match="attention inside the levels"):
        keymap.autoencoder_config_from_original({"encoder.down.3.attn.0.q.weight": torch.zeros(1)})
