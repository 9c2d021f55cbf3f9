"""A Stable Diffusion autoencoder on its own, as the community publishes them to replace a checkpoint's own VAE
(A1111's ``models/VAE`` and ``sd_vae`` setting, ComfyUI's VAELoader, diffusers' ``vae=``).

Layouts, told apart by what is there:

- a single file (``.safetensors``, ``.ckpt``, ``.pt``, ``.pth``; A1111's ``NAME.vae.pt`` too) in the CompVis
  layout (``encoder.down.*``; ``vae-ft-mse-840000-ema-pruned``), with or without the ``first_stage_model.`` prefix
  of a whole SD checkpoint (whose autoencoder is then taken), or in the diffusers layout (``encoder.down_blocks.*``,
  a lone ``diffusion_pytorch_model.safetensors``; its config is read off the shapes);
- a diffusers ``AutoencoderKL`` folder (``config.json`` + weights; ``sd-vae-ft-mse``), or a diffusers pipeline
  folder, whose ``vae/`` is taken;
- TAESD (:mod:`openldm.models.tiny_autoencoder`): the published halves (``taesd_decoder.pth`` /
  ``.safetensors``, with ``taesd_encoder`` taken from beside it when it is there), diffusers' ``AutoencoderTiny``
  folder or its lone weights file;
- openldm's own model file of an :class:`~openldm.models.autoencoder.AutoencoderKL` or a TAESD.

Keys outside the autoencoder (``loss.*``, ``model_ema.*`` bookkeeping, a checkpoint's UNet) are never read. The
latent scale is not the file's to say: SD's latent space belongs to the UNet, so the caller passes the model's
``scaling_factor`` and ``shift_factor`` (A1111 and ComfyUI keep the model's too); a TAESD works in that scaled space
already and keeps its factor of 1.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from openldm.io.components import SINGLE_FILE_SUFFIXES, assign_module, read_tensors
from openldm.io.diffusers_folder import component_weights
from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import tiny_autoencoder as tiny_keys
from openldm.io.native import load_model
from openldm.io.tensor_files import names_its_source
from openldm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from openldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

PREFIX = vae_keys.ORIGINAL_PREFIX  # first_stage_model.
_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # an autoencoder's own keys, either layout
_DIFFUSERS_MARKS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")
_TINY_DIFFUSERS_MARKS = ("encoder.layers.", "decoder.layers.")
_TAESD_KEY = re.compile(r"\d+\.(weight|bias|conv\.\d+\.(weight|bias)|skip\.weight)")  # a published TAESD half
VAE = AutoencoderKL | TinyAutoencoder
Config = AutoencoderKLConfig | TinyAutoencoderConfig


@names_its_source
def load_vae(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             unsafe_load: bool = False, scaling_factor: float | None = None,
             shift_factor: float | None = None) -> VAE:
    """The autoencoder at ``path`` (any layout above), its tensors memory-mapped and cast one at a time.
    ``scaling_factor`` / ``shift_factor``: the latent scale to give a KL autoencoder (None: the file's, else SD's
    0.18215); a TAESD keeps its own."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE path {str(path)!r} does not exist")
    if path.is_dir():
        cfg, state = _from_folder(path, unsafe_load)
    elif path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{str(path)!r}: a VAE file must end in {', '.join(SINGLE_FILE_SUFFIXES)}, or be a "
                         "diffusers folder")
    else:
        cfg, state = _from_file(path, unsafe_load)
        if cfg is None:  # openldm's own file
            vae = load_model(path, device=device, dtype=dtype)
            if not isinstance(vae, (AutoencoderKL, TinyAutoencoder)):
                raise ValueError(f"{str(path)!r} holds a {type(vae).__name__}, not a KL autoencoder (AutoencoderKL) "
                                 "or a TAESD")
            if isinstance(vae, AutoencoderKL):
                vae.config = _rescaled(vae.config, scaling_factor, shift_factor)
            return vae
    if isinstance(cfg, TinyAutoencoderConfig):
        return assign_module(TinyAutoencoder, cfg, state, what=f"{path} TAESD", device=device, dtype=dtype)
    if not isinstance(cfg, AutoencoderKLConfig):
        raise ValueError(f"{str(path)!r}: a VQ autoencoder; Stable Diffusion uses a KL autoencoder")  # noqa: TRY004
    return assign_module(AutoencoderKL, _rescaled(cfg, scaling_factor, shift_factor), state, what=f"{path} VAE",
                         device=device, dtype=dtype)


def _rescaled(cfg: AutoencoderKLConfig, scaling_factor: float | None,
              shift_factor: float | None) -> AutoencoderKLConfig:
    changes = {k: float(v) for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor))
               if v is not None}
    return dataclasses.replace(cfg, **changes)


def _from_folder(folder: Path, unsafe_load: bool) -> tuple[Config, dict[str, torch.Tensor]]:
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        folder = folder / "vae"  # a whole diffusers pipeline: its autoencoder
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: a diffusers VAE folder holds config.json and "
                                "diffusion_pytorch_model.safetensors (or give the weights file itself)")
    data = json.loads(config.read_text(encoding="utf-8"))
    weights = component_weights(folder, "diffusers", unsafe_load)
    if data.get("_class_name") == "AutoencoderTiny":
        return tiny_keys.config_from_diffusers(data), tiny_keys.from_diffusers(weights)
    cfg = vae_keys.autoencoder_config_from_diffusers(data)
    return cfg, vae_keys.from_diffusers(weights, cfg)


def _from_file(path: Path, unsafe_load: bool) -> tuple[Config | None, dict[str, torch.Tensor]]:
    """(config, our state dict) of a single file; (None, {}) for openldm's own model file."""
    def wanted(key: str) -> bool:
        return (key.startswith(_PARTS) or (key.startswith(PREFIX) and key[len(PREFIX):].startswith(_PARTS))
                or _TAESD_KEY.fullmatch(key) is not None)

    state, meta = read_tensors(path, unsafe_load=unsafe_load, keep=wanted)
    if "openldm.kind" in meta:
        return None, {}
    try:
        if state and all(_TAESD_KEY.fullmatch(k) for k in state):
            return _published_taesd(path, state, unsafe_load)
        state = {k: v for k, v in state.items() if not _TAESD_KEY.fullmatch(k)}
        if any(k.startswith(PREFIX) for k in state):  # a whole checkpoint, or a VAE saved under its prefix
            state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if not state:
            seen = sorted({".".join(k.split(".")[:2]) for k in read_tensors(path, unsafe_load=unsafe_load)[0]})[:12]
            raise ValueError(f"{str(path)!r} holds no autoencoder weights (encoder.*, decoder.*, {PREFIX}*, or a "
                             f"TAESD half); key prefixes seen: {seen or 'no tensors'}")
        if any(k.startswith(_TINY_DIFFUSERS_MARKS) for k in state):
            tiny = tiny_keys.from_diffusers(state)
            return tiny_keys.config_from_state(tiny), tiny
        if any(k.startswith(_DIFFUSERS_MARKS) for k in state):
            cfg = vae_keys.autoencoder_config_from_diffusers(vae_keys.diffusers_config_from_state(state))
            return cfg, vae_keys.from_diffusers(state, cfg)
        cfg = vae_keys.autoencoder_config_from_original(state)
        return cfg, vae_keys.from_original(state, cfg)
    except KeyError as e:
        raise ValueError(f"{str(path)!r} is not a complete autoencoder: {e.args[0]}") from None


def _published_taesd(path: Path, state: dict[str, torch.Tensor],
                     unsafe_load: bool) -> tuple[TinyAutoencoderConfig, dict[str, torch.Tensor]]:
    """A published TAESD half: the decoder (its first layer, the clamp, holds no weights: ``0.*`` is absent), with
    the encoder from the file named ``...encoder...`` beside it when there is one."""
    if "0.weight" in state:
        raise ValueError(f"{str(path)!r} is TAESD's encoder alone; give its decoder (taesd_decoder), which takes "
                         "the encoder from beside it")
    ours = tiny_keys.from_published(state, "decoder")
    encoder_file = path.with_name(path.name.replace("decoder", "encoder"))
    if encoder_file != path and encoder_file.is_file():
        encoder, _ = read_tensors(encoder_file, unsafe_load=unsafe_load)
        ours.update(tiny_keys.from_published(encoder, "encoder"))
    return tiny_keys.config_from_state(ours), ours
