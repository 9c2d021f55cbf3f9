"""VAEs in place of a Stable Diffusion checkpoint's own, as A1111 swaps them (its ``models/VAE`` folder and the
``sd_vae`` setting; ComfyUI's VAELoader): the folder's listing by name, a choice by name per request, and the
chosen autoencoder loaded once, on the model's device and dtype, with the model's latent scale.

A1111's "Automatic" and "None" both give the checkpoint's own VAE here (A1111's "Automatic" would also look for a
file named after the checkpoint; openldm takes only what is named).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import NamedTuple

import torch

from openldm.io.components import SINGLE_FILE_SUFFIXES
from openldm.io.files import short_hash
from openldm.io.vae import VAE, load_vae
from openldm.models.autoencoder import AutoencoderKL
from openldm.pipelines.common import module_device_dtype

OWN = ("Automatic", "None")  # A1111's sd_vae values that keep the checkpoint's own


def available(vae_dir: str | Path) -> dict[str, Path]:
    """The VAEs in ``vae_dir`` (and the folders under it) by name: a file's name (``NAME.safetensors``,
    ``NAME.vae.pt``...; A1111's ``model_name``) or a diffusers VAE folder's; sorted by name. Names that two files
    under the folder share are given as paths under it."""
    root = Path(vae_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"VAE folder {str(vae_dir)!r} does not exist")
    folders = [p for p in root.rglob("*") if p.is_dir() and (p / "config.json").is_file()]
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES
             and not any(p.is_relative_to(f) for f in folders)]  # a folder's weights are the folder's
    found = sorted(files + folders)
    names = [p.name for p in found]
    return dict(sorted((p.name if names.count(p.name) == 1 else p.relative_to(root).as_posix(), p) for p in found))


def resolve(name: str, vae_dir: str | Path | None) -> Path:
    """The VAE that ``name`` gives in ``vae_dir``; a ValueError naming the folder's VAEs when none is."""
    if vae_dir is None:
        raise ValueError(f"VAE {name!r} was asked for but no VAE folder is set; pass --vae-dir DIR (vae_dir=)")
    named = available(vae_dir)
    if name in named:
        return named[name]
    raise ValueError(f"no VAE {name!r} in {str(vae_dir)!r}; it holds {list(named)[:20] or 'no VAE files'} "
                     f"(or {' / '.join(OWN)}: the checkpoint's own)")


def fitted(path: str | Path, own: AutoencoderKL, *, unsafe_load: bool = False) -> VAE:
    """The VAE at ``path`` for the model whose own VAE is ``own``: its latent scale (a TAESD keeps its own), device,
    dtype and layout, in eval mode; a ValueError when its latents are not the model's (channels, downsampling)."""
    device, dtype = module_device_dtype(own)
    vae = load_vae(path, device=device, dtype=dtype, unsafe_load=unsafe_load,
                   scaling_factor=own.config.scaling_factor, shift_factor=own.config.shift_factor)
    theirs, ours = (vae.config.z_channels, vae.downsampling_factor), (own.config.z_channels, own.downsampling_factor)
    if theirs != ours:
        raise ValueError(f"VAE {str(path)!r} makes latents of {theirs[0]} channels at 1/{theirs[1]} of the image "
                         f"size; this model's are {ours[0]} channels at 1/{ours[1]}: it is a VAE for another model")
    return vae.to(memory_format=torch.channels_last).eval().requires_grad_(False)


class ChosenVae(NamedTuple):
    """A VAE to decode with, and what PNGs say of it: its name and A1111's short hash (None: the checkpoint's own,
    or a folder, which has no hash)."""

    module: VAE
    name: str | None = None
    hash: str | None = None


class VaeSwitch:
    """A model's VAEs by request: its own (None, or a name in :data:`OWN`; ``own`` with the name and hash PNGs give
    it), or one from ``vae_dir`` by name, loaded and hashed on first use and kept until another is asked for (one
    extra VAE in memory at a time, as A1111)."""

    def __init__(self, own: ChosenVae, vae_dir: str | Path | None = None, unsafe_load: bool = False):
        self.own, self.vae_dir, self.unsafe_load = own, vae_dir, unsafe_load
        self._loaded: tuple[Path, ChosenVae] | None = None
        self._lock = threading.Lock()

    def get(self, name: str | None) -> ChosenVae:
        if name is None or name in OWN:
            return self.own
        path = resolve(name, self.vae_dir)
        with self._lock:
            if self._loaded is None or self._loaded[0] != path:
                self._loaded = None  # the previous one goes before the next loads
                module = fitted(path, self.own.module, unsafe_load=self.unsafe_load)
                self._loaded = (path, ChosenVae(module, name, short_hash(path)))
            return self._loaded[1]
