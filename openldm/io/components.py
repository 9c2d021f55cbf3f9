"""The Stable Diffusion bundle and what every layout's reader and writer share: the components dataclass, sampling
settings and their diffusers form, building a module on the meta device from (memory-mapped) tensors, reading
tensor files safely, and atomic folder writes. The layouts themselves live in original.py, diffusers_folder.py and
sd.py (our own folder, format detection and conversion)."""
from __future__ import annotations

import os
import re
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
from openldm.io.tensor_files import build_within, check_finite, check_fits, open_safetensors, read_header
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
    what = what or cls.__name__
    module = build_within(cls, config, [tuple(t.shape) for t in state.values()], what)
    check_fits(module, {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}, what)
    cast = {}
    for key, t in state.items():
        check_finite(t, key, what)
        cast[key] = t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)
    module.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{what}: buffers {left} were not restored from the file")
    return module.eval()




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


# ---- reading tensor files -----------------------------------------------------------------------------------

def read_tensors(path: str | Path, *, unsafe_load: bool = False,
                 keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a ``.safetensors`` file or a torch pickle (``.ckpt``/``.bin``/``.pt``), memory
    mapped. A pickle's nested ``"state_dict"`` is unwrapped. ``keep`` selects keys (others are never touched).

    A safetensors header is checked before the library reads the file (:func:`~openldm.io.tensor_files.read_header`).
    Pickles load with ``weights_only=True``; one that needs full unpickling raises unless ``unsafe_load``. A damaged
    or foreign file is a ValueError naming it.
    """
    path = Path(path)
    keep = keep or (lambda key: True)
    if path.suffix.lower() == ".safetensors":
        header = read_header(path)
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in header.tensors if keep(k)}, header.metadata
    obj = _torch_load(path, unsafe_load)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")  # noqa: TRY004
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor) and keep(k)}, {}


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # legacy torch files open with this pickled magic number


def _torch_load(path: Path, unsafe_load: bool):
    """``torch.load`` of a checkpoint, memory mapped when it is a zip archive. Only torch's two formats are handed to
    it; unpickling errors say whether the file is damaged or needs full unpickling (and ``unsafe_load``)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    with path.open("rb") as f:
        head = f.read(32)
    if not head:
        raise ValueError(f"{str(path)!r} is unreadable: it is empty (0 bytes)")
    legacy = head.startswith(b"\x80") and _LEGACY_MAGIC in head[:16]  # a pickle (any protocol) of the magic number
    if not head.startswith(_ZIP_MAGIC) and not legacy:
        raise ValueError(f"{str(path)!r} is unreadable: not a PyTorch checkpoint (neither torch.save's zip archive "
                         f"nor its legacy pickle; it starts with {head[:8]!r})")
    if legacy:  # pre-zip files cannot be memory mapped: read into memory once
        warnings.warn(f"{path}: legacy torch file, read into memory without memory mapping")
    import pickle
    try:
        return torch.load(path, map_location="cpu", mmap=not legacy, weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        needs = re.search(r"Unsupported global: (GLOBAL [\w.]+)", text)
        if not unsafe_load and needs:
            raise ValueError(f"{str(path)!r} cannot be loaded safely: it needs full unpickling ({needs.group(1)}), "
                             "which can run arbitrary code. If you trust this file, pass --unsafe-load "
                             "(unsafe_load=True), or convert it once to .safetensors") from None
        raise ValueError(f"{str(path)!r} is unreadable: a damaged torch checkpoint ({_first_line(e)})") from None
    except (ModuleNotFoundError, AttributeError) as e:  # only with unsafe_load: a class the pickle names is absent
        raise ValueError(f"{str(path)!r} cannot be unpickled here: it needs {_first_line(e)}; install what it needs "
                         "or convert it to .safetensors where it loads") from None
    except Exception as e:  # noqa: BLE001 (torch's readers fail on damaged archives in many ways)
        raise ValueError(f"{str(path)!r} is unreadable: a damaged torch checkpoint ({type(e).__name__}: "
                         f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an error's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    text = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
    return text[:300]
