"""Original (CompVis) Stable Diffusion v1 single files: ``.safetensors`` or ``.ckpt``.

One state dict holds three models under prefixes: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(KL autoencoder), ``cond_stage_model.transformer.*`` (CLIP ViT-L/14 text tower). Everything else is ignored: the
DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...), ``model_ema.*`` (unless ``use_ema``), ``loss.*``.
Configs come from tensor shapes (SD conventions fill in what shapes cannot say: 8 UNet heads, 32 GroupNorm groups,
CLIP heads of width 64), or from ``openldm.*`` metadata when openldm wrote the file. The schedule and tokenizer
are SD v1's: the file does not store them (openldm's own files carry the schedule in their metadata).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from openldm.config import from_dict, to_dict
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, make_betas
from openldm.io.components import (
    StableDiffusionComponents,
    assign_module,
    read_tensors,
    settings_from_dict,
)
from openldm.io.files import atomic_path
from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from openldm.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from openldm.models.unet import UNet, UNetConfig
from openldm.tokenizers.clip_bpe import CLIPTokenizer

UNET_PREFIX = unet_keys.ORIGINAL_PREFIX  # model.diffusion_model.
VAE_PREFIX = vae_keys.ORIGINAL_PREFIX  # first_stage_model.
TEXT_PREFIX = clip_keys.ORIGINAL_PREFIX  # cond_stage_model.transformer.
OPEN_CLIP_PREFIX = clip_keys.OPEN_CLIP_PREFIX  # cond_stage_model.model. (SD 2)
EMA_PREFIX = "model_ema."
CLIP_HEAD_DIM = 64  # CLIP text towers use heads of width 64 (ViT-L/14: 768 / 12)
# Metadata openldm adds to the files it writes (configs, sampling settings); other writers' files lack it.
META_SETTINGS, META_UNET, META_VAE, META_TEXT = "openldm.sd", "openldm.unet", "openldm.vae", "openldm.text_encoder"


def ema_key(unet_key: str) -> str:
    """The ``model_ema.*`` name of a UNet key: CompVis' LitEma stores ``model.X.Y`` as ``model_ema.XY`` (the
    name after ``model.`` with its dots removed, buffers cannot have dots in their names)."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def _layout_error(path: Path, keys: list[str], problem: str) -> ValueError:
    prefixes: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        prefixes[head] = prefixes.get(head, 0) + 1
    seen = ", ".join(f"{p} ({n})" for p, n in sorted(prefixes.items())[:20]) or "no tensors"
    return ValueError(f"{str(path)!r} is not an SD v1 single file in the CompVis layout: {problem}. "
                      f"Expected {UNET_PREFIX}*, {VAE_PREFIX}* and {TEXT_PREFIX}*; key prefixes seen: {seen}")


def clip_config_from_original(state: Mapping[str, torch.Tensor]) -> CLIPTextConfig:
    """A CLIP text config from the shapes of its state dict under our names (heads of width 64, quick-GELU)."""
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    positions = state["embeddings.position_embedding.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
                          intermediate_size=intermediate)


def load_original(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  unsafe_load: bool = False, use_ema: bool = False) -> StableDiffusionComponents:
    """Load an SD v1 single file. ``use_ema`` takes the UNet from ``model_ema.*`` when the file has it."""
    path = Path(path)
    wanted = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX) if use_ema else (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    state, meta = read_tensors(path, unsafe_load=unsafe_load, 
                               keep=lambda k: k.startswith((*wanted, OPEN_CLIP_PREFIX)) or k == "alphas_cumprod")
    if "openldm.kind" in meta:
        raise ValueError(f"{str(path)!r} is a single openldm model file ({meta['openldm.kind']}), not a Stable "
                         "Diffusion checkpoint; load it with openldm.io.native.load_model")
    keys = [k for k in state if k != "alphas_cumprod"]
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        all_keys = list(read_tensors(path, unsafe_load=unsafe_load)[0]) if not keys else keys
        raise _layout_error(path, all_keys, f"no UNet weights ({UNET_PREFIX}*)")
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        raise ValueError(f"{str(path)!r} is an SD 2.x single file (OpenCLIP text encoder, {OPEN_CLIP_PREFIX}*): not "
                         "supported, because the file does not say whether it predicts eps or v; load its diffusers "
                         "folder (with scheduler/scheduler_config.json) instead")
    for prefix, what in ((VAE_PREFIX, "autoencoder"), (TEXT_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise _layout_error(path, keys, f"no {what} weights ({prefix}*)")

    unet_state = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if use_ema:
        ema = {k: ema_key(UNET_PREFIX + k) for k in unet_state}
        if all(e in state for e in ema.values()):
            unet_state = {k: state[e] for k, e in ema.items()}
        else:
            warnings.warn(f"{path}: use_ema requested but the file has no complete model_ema.* UNet weights; "
                          "using model.diffusion_model.*")
    vae_state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    text_state = clip_keys.from_original(state)

    unet_cfg = from_dict(UNetConfig, json.loads(meta[META_UNET])) if META_UNET in meta \
        else unet_keys.unet_config_from_original(unet_state)
    vae_cfg = from_dict(AutoencoderKLConfig, json.loads(meta[META_VAE])) if META_VAE in meta \
        else vae_keys.autoencoder_config_from_original(vae_state)
    if not isinstance(vae_cfg, AutoencoderKLConfig):
        raise ValueError(f"{str(path)!r}: the autoencoder is a VQ model; Stable Diffusion uses a KL autoencoder")  # noqa: TRY004
    text_cfg = from_dict(CLIPTextConfig, json.loads(meta[META_TEXT])) if META_TEXT in meta \
        else clip_config_from_original(text_state)

    kwargs = {"device": device, "dtype": dtype}
    unet = assign_module(UNet, unet_cfg, unet_keys.from_original(unet_state, unet_cfg), what=f"{path} UNet", **kwargs)
    vae = assign_module(AutoencoderKL, vae_cfg, vae_keys.from_original(vae_state, vae_cfg), what=f"{path} VAE",
                        **kwargs)
    text = assign_module(CLIPTextEncoder, text_cfg, text_state, what=f"{path} text encoder", **kwargs)
    settings = settings_from_dict(json.loads(meta[META_SETTINGS])) if META_SETTINGS in meta else {}
    if not settings and not default_schedule_matches(state):
        warnings.warn(f"{path}: its alphas_cumprod buffer is not SD v1's schedule; SD v1's is used "
                      "(convert from a diffusers folder to keep another schedule)")
    return StableDiffusionComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_bpe_file(),
                                     **settings)


def original_state_dict(sd: StableDiffusionComponents, schedule_buffers: bool = True) -> dict[str, torch.Tensor]:
    """``sd``'s weights under CompVis single-file names (tensors shared with the modules, not copied)."""
    state = {UNET_PREFIX + k: v for k, v in unet_keys.to_original(sd.unet.state_dict(), sd.unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_keys.to_original(sd.vae.state_dict(), sd.vae.config).items()})
    text = sd.text_encoder.state_dict()
    state.update(clip_keys.to_original(text))
    positions = sd.text_encoder.config.max_position_embeddings
    state[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # as CompVis files hold
    if schedule_buffers:  # what CompVis' DDPM registers first; readers ignore them
        alphas_cumprod = make_alphas_cumprod(sd.schedule)
        state["betas"] = make_betas(sd.schedule)
        state["alphas_cumprod"] = alphas_cumprod
        state["alphas_cumprod_prev"] = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    return state


def save_original(sd: StableDiffusionComponents, path: str | Path, schedule_buffers: bool = True) -> Path:
    """Write ``sd`` as one CompVis-layout ``.safetensors`` file, atomically. openldm metadata (configs and
    sampling settings) rides along so that a round trip is lossless; other readers ignore it."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{str(path)!r}: original-layout files are written as .safetensors only")
    state = {k: v.detach().contiguous() for k, v in original_state_dict(sd, schedule_buffers).items()}
    meta = {"format": "pt", META_SETTINGS: json.dumps(sd.sampling_settings()),
            META_UNET: json.dumps(to_dict(sd.unet.config)), META_VAE: json.dumps(to_dict(sd.vae.config)),
            META_TEXT: json.dumps(to_dict(sd.text_encoder.config))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def default_schedule_matches(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file's ``alphas_cumprod`` buffer (if any) is SD v1's default schedule."""
    if "alphas_cumprod" not in state:
        return True
    ref = make_alphas_cumprod(ScheduleConfig())
    got = state["alphas_cumprod"]
    return got.shape == ref.shape and torch.allclose(got.float(), ref, rtol=2e-3, atol=1e-5)  # fp16 files
