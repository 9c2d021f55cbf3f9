"""Stable Diffusion v1-family and 2.x models as one bundle, whatever layout they arrive in.

Three layouts, told apart by :func:`detect_format`:

- ``original``: one CompVis single file, ``.safetensors`` or ``.ckpt`` (:mod:`openldm.io.original`);
- ``diffusers``: a folder with ``model_index.json`` (:mod:`openldm.io.diffusers_folder`);
- ``openldm``: a folder of our own model files (``unet.safetensors``, ``vae.safetensors``,
  ``text_encoder.safetensors``, see :mod:`openldm.io.native`), ``tokenizer/`` and ``sd.json`` (schedule and
  prediction), read and written here.

Every loader builds the modules on the meta device and assigns memory-mapped tensors into them, cast one tensor at
a time: the weights are never held twice, and with a matching dtype the module's tensors *are* the mapped file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from openldm.io.components import (
    FORMATS,
    OPENLDM_FILES,
    OPENLDM_INDEX,
    SINGLE_FILE_SUFFIXES,
    StableDiffusionComponents,
    atomic_folder,
    settings_from_dict,
)
from openldm.io.diffusers_folder import load_diffusers, save_diffusers
from openldm.io.native import load_model, save_model
from openldm.io.original import load_original, save_original
from openldm.io.tensor_files import names_its_source
from openldm.models.autoencoder import AutoencoderKL
from openldm.models.text_encoder import CLIPTextEncoder
from openldm.models.unet import UNet
from openldm.tokenizers.clip_bpe import CLIPTokenizer

# ---- format detection, loading, conversion ------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """``original`` (a single file), ``diffusers`` (folder with model_index.json) or ``openldm`` (folder with
    sd.json). Anything else raises, saying what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{str(path)!r}: single-file checkpoints must end in {', '.join(SINGLE_FILE_SUFFIXES)}")
        return "original"
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / OPENLDM_INDEX).is_file():
        return "openldm"
    seen = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(f"{str(path)!r} is neither a diffusers folder (model_index.json) nor an openldm folder "
                     f"({OPENLDM_INDEX}); it holds {seen}")


@names_its_source
def load_sd(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            unsafe_load: bool = False, use_ema: bool = False,
            prediction: str | None = None) -> StableDiffusionComponents:
    """Load a Stable Diffusion v1 or 2.x model from a single file, a diffusers folder or an openldm folder.

    ``dtype`` casts floating weights (``None``: as stored). ``unsafe_load`` allows ``.ckpt``/``.bin`` files that
    need full unpickling (arbitrary code: only for files you trust). ``use_ema`` reads a single file's
    ``model_ema.*`` UNet weights when present. ``prediction`` (eps | v) overrides what the model says (folders:
    their scheduler config; single files: the sidecar YAML, see :mod:`openldm.io.original`); SD 2 single files
    without a YAML need it.
    """
    kind = detect_format(path)
    if kind == "original":
        return load_original(path, device=device, dtype=dtype, unsafe_load=unsafe_load, use_ema=use_ema,
                             prediction=prediction)
    if kind == "diffusers":
        sd = load_diffusers(path, device=device, dtype=dtype, unsafe_load=unsafe_load)
    else:
        sd = load_openldm(path, device=device, dtype=dtype)
    return sd if prediction is None else dataclasses.replace(sd, prediction=prediction)  # validated there


def load_openldm(path: str | Path, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> StableDiffusionComponents:
    """Read an openldm folder written by :func:`save_openldm`."""
    folder = Path(path)
    for name in [OPENLDM_INDEX, *OPENLDM_FILES.values()]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: an openldm Stable Diffusion folder needs {name}; it is missing")
    settings = json.loads((folder / OPENLDM_INDEX).read_text(encoding="utf-8"))
    modules = {name: load_model(folder / file, device=device, dtype=dtype) for name, file in OPENLDM_FILES.items()}
    expected = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}
    for name, module in modules.items():
        if type(module) is not expected[name]:
            raise ValueError(f"{folder / OPENLDM_FILES[name]} holds a {type(module).__name__}; "
                             f"expected {expected[name].__name__}")
    if not (folder / "tokenizer").is_dir():
        raise FileNotFoundError(f"{folder}: the tokenizer/ folder is missing")
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    return StableDiffusionComponents(**modules, tokenizer=tokenizer, **settings_from_dict(settings))


def save_openldm(sd: StableDiffusionComponents, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``sd`` as an openldm folder: our model files, ``tokenizer/`` and ``sd.json``, atomically."""
    with atomic_folder(path, overwrite) as tmp:
        for name, file in OPENLDM_FILES.items():
            save_model(getattr(sd, name), tmp / file)
        sd.tokenizer.save_folder(tmp / "tokenizer")
        index = {"format": "openldm-sd", "version": 1, **sd.sampling_settings()}
        (tmp / OPENLDM_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def save_sd(sd: StableDiffusionComponents, path: str | Path, to: str, overwrite: bool = False) -> Path:
    """Write ``sd`` in layout ``to`` (original | diffusers | openldm)."""
    if to == "original":
        if Path(path).exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
        return save_original(sd, path)
    if to == "diffusers":
        return save_diffusers(sd, path, overwrite=overwrite)
    if to == "openldm":
        return save_openldm(sd, path, overwrite=overwrite)
    raise ValueError(f"to={to!r}; accepted: {', '.join(FORMATS)}")


def convert(src: str | Path, dst: str | Path, to: str, *, dtype: torch.dtype | None = None,
            unsafe_load: bool = False, use_ema: bool = False, overwrite: bool = False,
            prediction: str | None = None) -> Path:
    """Convert the model at ``src`` (any layout :func:`load_sd` reads) to layout ``to`` at ``dst``, atomically.
    ``dtype`` casts floating weights (``None``: as stored); ``prediction`` as in :func:`load_sd`."""
    if to not in FORMATS:
        raise ValueError(f"to={to!r}; accepted: {', '.join(FORMATS)}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"source and destination are the same path {str(src)!r}")
    sd = load_sd(src, dtype=dtype, unsafe_load=unsafe_load, use_ema=use_ema, prediction=prediction)
    return save_sd(sd, dst, to, overwrite=overwrite)
