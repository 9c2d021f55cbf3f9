"""Tiny random-weight Stable Diffusion parts built by diffusers/transformers, and ours holding the same tensors
through the key maps, for pipeline parity tests."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from openldm.diffusion.schedules import ScheduleConfig  # noqa: E402
from openldm.io.keymaps import autoencoder as vae_keymap  # noqa: E402
from openldm.io.keymaps import clip as clip_keymap  # noqa: E402
from openldm.io.keymaps import unet as unet_keymap  # noqa: E402
from openldm.models.autoencoder import AutoencoderKL  # noqa: E402
from openldm.models.text_encoder import CLIPTextEncoder, tiny_text_config  # noqa: E402
from openldm.models.unet import UNet  # noqa: E402
from openldm.tokenizers.clip_bpe import CLIPTokenizer  # noqa: E402

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, timestep_spacing="leading")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one torch thread (the fixture lives in tests/conftest.py)."""


def _randomise_norms(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_theirs(in_channels: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=64).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, hidden_act="quick_gelu")).eval()
    for i, m in enumerate((unet, vae, text)):
        _randomise_norms(m, seed + i)
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm for clip_skip; transformers 5 has no text_model
    text.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=text.final_layer_norm)
    return dict(unet=unet, vae=vae, text_encoder=text)


def build_ours(theirs: dict, tokenizer: CLIPTokenizer) -> types.SimpleNamespace:
    ucfg = unet_keymap.unet_config_from_diffusers(dict(theirs["unet"].config))
    unet = UNet(ucfg).eval()
    unet.load_state_dict(unet_keymap.from_diffusers(theirs["unet"].state_dict(), ucfg))
    vcfg = vae_keymap.autoencoder_config_from_diffusers(dict(theirs["vae"].config))
    vae = AutoencoderKL(vcfg).eval()
    vae.load_state_dict(vae_keymap.from_diffusers(theirs["vae"].state_dict(), vcfg))
    text = CLIPTextEncoder(tiny_text_config()).eval()
    text.load_state_dict(clip_keymap.from_diffusers(theirs["text_encoder"].state_dict()))
    return types.SimpleNamespace(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                 schedule=ScheduleConfig(), prediction="eps", spacing="leading", steps_offset=1)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    ours = CLIPTokenizer.from_bpe_file()
    folder = tmp_path_factory.mktemp("tokenizer")
    ours.save_folder(folder)
    return ours, transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def sd_pair(tokenizers):
    """(ours, theirs modules dict) for a 4-channel UNet."""
    theirs = build_theirs(4)
    return build_ours(theirs, tokenizers[0]), theirs


@pytest.fixture(scope="session")
def sd_inpaint_pair(tokenizers):
    theirs = build_theirs(9, seed=1)
    return build_ours(theirs, tokenizers[0]), theirs


SCHEDULERS = {
    "ddim": lambda karras: diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True),
    "euler": lambda karras: diffusers.EulerDiscreteScheduler(**SCHEDULE, use_karras_sigmas=karras),
    "euler_ancestral": lambda karras: diffusers.EulerAncestralDiscreteScheduler(**SCHEDULE),
    "heun": lambda karras: diffusers.HeunDiscreteScheduler(**SCHEDULE, use_karras_sigmas=karras),
    "dpmpp_2m": lambda karras: diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++",
                                                                     use_karras_sigmas=karras),
}


def diffusers_pipe(cls, theirs: dict, hf_tokenizer, sampler: str, karras: bool = False):
    pipe = cls(unet=theirs["unet"], vae=theirs["vae"], text_encoder=theirs["text_encoder"], tokenizer=hf_tokenizer,
               scheduler=SCHEDULERS[sampler](karras), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close_fraction(ours, theirs, tol: int = 2) -> float:
    """Fraction of pixel values within ``tol``/255 between two lists of PIL images."""
    a = np.stack([np.asarray(i, dtype=np.int16) for i in ours])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in theirs])
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.abs(a - b) <= tol).mean())
