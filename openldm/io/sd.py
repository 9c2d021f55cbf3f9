"""Stable Diffusion v1-family models as one bundle, whatever layout they arrive in.

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

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from openldm.config import from_dict, to_dict
from openldm.diffusion.schedules import ScheduleConfig
from openldm.io.native import load_model, save_model
from openldm.models.autoencoder import AutoencoderKL
from openldm.models.text_encoder import CLIPTextEncoder
from openldm.models.unet import UNet
from openldm.tokenizers.clip_bpe import CLIPTokenizer

FORMATS = ("original", "diffusers", "openldm")
PREDICTIONS = ("eps", "v")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
OPENLDM_INDEX = "sd.json"  # the openldm folder's marker: schedule, prediction, spacing, steps_offset
OPENLDM_FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}
INPAINT_CONCAT_CHANNELS = 5  # SD inpainting: mask (1) + masked-image latent (4) beside the noisy latent


@dataclass
class StableDiffusionComponents:
    """Everything a Stable Diffusion v1-family pipeline needs. The defaults are SD v1's scheduler config."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"  # eps | v
    spacing: str = "leading"  # leading | trailing | linspace (diffusers' timestep_spacing)
    steps_offset: int = 1

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}; accepted: {', '.join(PREDICTIONS)}")

    @property
    def is_inpainting(self) -> bool:
        """A 9-input-channel UNet: noisy latent (4) + mask (1) + masked-image latent (4)."""
        return self.unet.config.concat_channels == INPAINT_CONCAT_CHANNELS

    def sampling_settings(self) -> dict:
        """The schedule and sampling conventions as JSON-ready data (what ``sd.json`` stores)."""
        return {"schedule": to_dict(self.schedule), "prediction": self.prediction, "spacing": self.spacing,
                "steps_offset": self.steps_offset}


def settings_from_dict(data: Mapping) -> dict:
    """Keyword arguments of :class:`StableDiffusionComponents` (schedule, prediction, ...) from
    :meth:`~StableDiffusionComponents.sampling_settings` data."""
    out = {k: data[k] for k in ("prediction", "spacing", "steps_offset") if k in data}
    if "schedule" in data:
        out["schedule"] = from_dict(ScheduleConfig, data["schedule"])
    return out


# ---- diffusers scheduler configs ----------------------------------------------------------------------------

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def scheduler_settings_from_diffusers(config: Mapping) -> dict:
    """Schedule, prediction, spacing and steps_offset from a diffusers ``scheduler_config.json`` (any of its
    DDPM-family schedulers: the training schedule fields are shared). Sampler choice is ours, not the file's."""
    kinds = {v: k for k, v in _BETA_SCHEDULES.items()}
    beta = config.get("beta_schedule", "linear")
    if beta not in kinds:
        raise ValueError(f"scheduler beta_schedule={beta!r}; accepted: {', '.join(kinds)}")
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler trained_betas (an explicit beta table) is not supported; accepted: null")
    predictions = {v: k for k, v in _PREDICTION_TYPES.items()}
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in predictions:
        raise ValueError(f"scheduler prediction_type={prediction!r}; accepted: {', '.join(predictions)}")
    schedule = ScheduleConfig(kind=kinds[beta], num_train_steps=int(config.get("num_train_timesteps", 1000)),
                              beta_start=float(config.get("beta_start", 0.0001)),
                              beta_end=float(config.get("beta_end", 0.02)),
                              zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)))
    return {"schedule": schedule, "prediction": predictions[prediction],
            "spacing": config.get("timestep_spacing", "leading"), "steps_offset": int(config.get("steps_offset", 0))}


def scheduler_config_to_diffusers(sd: StableDiffusionComponents) -> dict:
    """A ``scheduler/scheduler_config.json`` for ``sd``'s schedule (SD v1.5's PNDMScheduler settings)."""
    s = sd.schedule
    return {"_class_name": "PNDMScheduler", "beta_start": s.beta_start, "beta_end": s.beta_end,
            "beta_schedule": _BETA_SCHEDULES[s.kind], "num_train_timesteps": s.num_train_steps,
            "prediction_type": _PREDICTION_TYPES[sd.prediction], "timestep_spacing": sd.spacing,
            "steps_offset": sd.steps_offset, "rescale_betas_zero_snr": s.zero_terminal_snr,
            "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}


# ---- building modules without a second copy -----------------------------------------------------------------

def assign_module(cls: type[nn.Module], config, state: Mapping[str, torch.Tensor], *,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None, what: str = "") -> nn.Module:
    """``cls(config)`` built on the meta device with ``state``'s tensors assigned in (strict), each moved to
    ``device`` and cast to ``dtype`` (floating tensors only; ``None`` keeps the stored dtype) one at a time.
    A tensor already on ``device`` in ``dtype`` is used as is: a memory-mapped source stays the only copy."""
    with torch.device("meta"):
        module = cls(config)
    cast = {}
    for key, t in state.items():
        t = t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        cast[key] = t
    try:
        module.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{what or cls.__name__}: the weights do not fit the derived config: {e}") from None
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{what or cls.__name__}: buffers {left} were not restored from the file")
    return module.eval()


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


def load_sd(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            unsafe_load: bool = False, use_ema: bool = False) -> StableDiffusionComponents:
    """Load a Stable Diffusion v1-family model from a single file, a diffusers folder or an openldm folder.

    ``dtype`` casts floating weights (``None``: as stored). ``unsafe_load`` allows ``.ckpt``/``.bin`` files that
    need full unpickling (arbitrary code: only for files you trust). ``use_ema`` reads a single file's
    ``model_ema.*`` UNet weights when present.
    """
    kind = detect_format(path)
    if kind == "original":
        from openldm.io.original import load_original
        return load_original(path, device=device, dtype=dtype, unsafe_load=unsafe_load, use_ema=use_ema)
    if kind == "diffusers":
        from openldm.io.diffusers_folder import load_diffusers
        return load_diffusers(path, device=device, dtype=dtype, unsafe_load=unsafe_load)
    return load_openldm(path, device=device, dtype=dtype)


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


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (an existing ``path`` is replaced
    only with ``overwrite``), on error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        from openldm.io.original import save_original
        if Path(path).exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
        return save_original(sd, path)
    if to == "diffusers":
        from openldm.io.diffusers_folder import save_diffusers
        return save_diffusers(sd, path, overwrite=overwrite)
    if to == "openldm":
        return save_openldm(sd, path, overwrite=overwrite)
    raise ValueError(f"to={to!r}; accepted: {', '.join(FORMATS)}")


def convert(src: str | Path, dst: str | Path, to: str, *, dtype: torch.dtype | None = None,
            unsafe_load: bool = False, use_ema: bool = False, overwrite: bool = False) -> Path:
    """Convert the model at ``src`` (any layout :func:`load_sd` reads) to layout ``to`` at ``dst``, atomically.
    ``dtype`` casts floating weights (``None``: as stored)."""
    if to not in FORMATS:
        raise ValueError(f"to={to!r}; accepted: {', '.join(FORMATS)}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"source and destination are the same path {str(src)!r}")
    sd = load_sd(src, dtype=dtype, unsafe_load=unsafe_load, use_ema=use_ema)
    return save_sd(sd, dst, to, overwrite=overwrite)



# ---- reading tensor files -----------------------------------------------------------------------------------

def read_tensors(path: str | Path, *, unsafe_load: bool = False,
                 keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a ``.safetensors`` file or a torch pickle (``.ckpt``/``.bin``/``.pt``), memory
    mapped. A pickle's nested ``"state_dict"`` is unwrapped. ``keep`` selects keys (others are never touched).

    Pickles load with ``weights_only=True``; one that needs full unpickling raises unless ``unsafe_load``.
    """
    path = Path(path)
    keep = keep or (lambda key: True)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            names = [k for k in f.keys() if keep(k)]  # noqa: SIM118 (a file handle, not a dict)
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    obj = _torch_load(path, unsafe_load)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")  # noqa: TRY004
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and keep(k)}, {}


def _torch_load(path: Path, unsafe_load: bool):
    import pickle
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r} cannot be loaded safely: it needs full unpickling, which can run arbitrary "
                         f"code ({reason[:300]}). If you trust this file, pass --unsafe-load (unsafe_load=True), or "
                         "convert it once to .safetensors") from None
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    # Legacy (pre-zip) pickles cannot be memory mapped: they are read into memory once.
    warnings.warn(f"{path}: legacy torch file, read into memory without memory mapping")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{str(path)!r} cannot be loaded safely: it needs full unpickling. If you trust this "
                         "file, pass --unsafe-load (unsafe_load=True)") from e
