"""The run directory: the one owner of its layout. Training writes through it, inference reads through it.

A run directory (``out_dir`` of ``openldm train``, an exported run, a bundled model) holds:

- ``config.yaml``                 the resolved :class:`DiffusionTrainConfig` (read back with :func:`read_config`,
                                  older keys upgraded by :func:`upgrade_config`)
- ``unet.safetensors``            raw UNet weights + UNet config (an openldm model file)
- ``unet_ema.safetensors``        the EMA UNet (what sampling uses by default); both UNet files carry the latent
                                  scale in their metadata (``SCALING_FACTOR_KEY``)
- ``conditioner.safetensors``     trainable conditioner weights (raw and ``ema.`` prefixed)
- ``data.json``                   what sampling needs to know of the data without it (:func:`data_facts`)
- ``sampling.json``               the model's recommended sampling settings (sampler, steps, guidance_scale,
                                  karras, width, height), optional; the CLI, the API and the page start from them
- ``training_state.safetensors``  optimiser, LR schedule, step, RNG and data position (training/ only)
- ``checkpoints/step_XXXXXX/``    whole checkpoints (the weight files above + training state + ``manifest.json``),
                                  each written in full before ``checkpoints/latest`` names it; the files above are
                                  links to the latest one (``openldm.training.checkpoint`` writes them)
- ``snapshots/step_XXXXXX/``      EMA weights of chosen steps
- LoRA runs (a ``lora`` section) hold no UNet files: ``lora.safetensors`` is the EMA adapters in the kohya layout
  (what diffusers and AUTOMATIC1111 load, :mod:`openldm.io.lora`) and ``lora_weights.safetensors`` the raw and
  ``ema.``-prefixed adapters under openldm module names (what a resume reads); the base model stays where
  ``base_model`` names it
- ``metrics.jsonl``, ``samples/``, ``latents/``, ``tensorboard/``: training's logs and caches

Paths inside the config (``autoencoder``, ``base_model``) are looked up in the run directory first, so a run that
carries its autoencoder can be moved anywhere (``openldm.io.files.find_in_run``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from openldm.config import PRECISIONS, ConditionConfig, DataSpec, LoRAConfig, OptimConfig, from_dict, to_dict
from openldm.diffusion.objectives import PREDICTION_TYPES
from openldm.diffusion.schedules import ScheduleConfig
from openldm.io.components import read_tensors
from openldm.io.files import atomic_path, find_in_run
from openldm.io.lora import save_kohya_lora
from openldm.io.native import load_model, read_metadata, save_model
from openldm.io.tensor_files import check_finite

CONFIG_FILE = "config.yaml"
UNET_FILE = "unet.safetensors"
UNET_EMA_FILE = "unet_ema.safetensors"
CONDITIONER_FILE = "conditioner.safetensors"
LORA_FILE = "lora.safetensors"  # LoRA runs: the EMA adapters, kohya layout
LORA_WEIGHTS_FILE = "lora_weights.safetensors"  # LoRA runs: raw + "ema." adapters, openldm module names
DATA_FILE = "data.json"
SAMPLING_FILE = "sampling.json"
STATE_FILE = "training_state.safetensors"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "checkpoints"  # whole checkpoints, one folder per step; CHECKPOINTS/LATEST names the newest complete one
LATEST = "latest"
SCALING_FACTOR_KEY = "openldm.scaling_factor"  # the run's latent scale, in the UNet files' metadata
_LEGACY_SCALING_FACTOR_KEY = "openldm.latent_scale"  # the same number as files written before 2026-12 name it
TRAINED_SAMPLING = {"sampler": "ddim", "steps": 50, "guidance_scale": 3.0}  # a run without sampling.json


@dataclass
class DiffusionTrainConfig:
    data: DataSpec = field(default_factory=DataSpec)
    autoencoder: str | None = None  # openldm autoencoder file; None trains in pixel space
    base_model: str | None = None  # SD checkpoint to fine-tune (single file / diffusers / openldm folder); with
    # a lora section also a run directory of `openldm train`
    lora: LoRAConfig | None = None  # train LoRA adapters on the frozen UNet of base_model (only they are saved)
    cache_latents: bool = True  # False: encode each batch with the frozen autoencoder as it is drawn
    unet_preset: str = "tiny-unet"  # (not with base_model: the UNet is the checkpoint's)
    unet: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    conditions: list[ConditionConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"  # eps | v | x0
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting; None = plain MSE
    offset_noise: float = 0.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32  # global batch (over all processes and accumulation steps)
    grad_accum: int = 1
    steps: int = 1000
    ema_decay: float = 0.999
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, GPU)
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/diffusion"
    log_every: int = 25
    save_every: int = 500
    keep_checkpoints: int = 2  # whole checkpoints kept under checkpoints/ (the newest; the others are deleted)
    snapshot_every: int = 0  # keep the EMA weights of every N-th step under snapshots/ (0 = never)
    num_workers: int = 0
    sample_every: int = 0  # write a sample grid every N steps (0 = never)
    sample_steps: int = 20  # DDIM steps of those samples
    sample_guidance: float = TRAINED_SAMPLING["guidance_scale"]  # their classifier-free guidance scale
    low_res_factor: int | None = None  # removed: now the low_res condition's options.factor (kept to say so)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction {self.prediction!r} is not one of {PREDICTION_TYPES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of grad_accum={self.grad_accum}")
        for name in ("steps", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every={self.snapshot_every} must be >= 0 (0 = no snapshots)")
        if self.sample_every < 0 or self.sample_steps < 1:
            raise ValueError(f"sample_every={self.sample_every} must be >= 0 and sample_steps={self.sample_steps} >= 1")
        if self.low_res_factor is not None:
            raise ValueError(f"low_res_factor={self.low_res_factor} is no longer a training option: the factor belongs "
                             "to the low-res condition; remove the top-level key and write it as "
                             f"conditions: [{{kind: low_res, options: {{factor: {self.low_res_factor}}}}}]")
        if self.base_model is not None:
            if self.autoencoder is not None:
                raise ValueError(f"base_model={self.base_model!r} brings its own autoencoder (the checkpoint's VAE); "
                                 f"remove autoencoder={self.autoencoder!r}")
            if self.unet or self.unet_preset != "tiny-unet":
                raise ValueError(f"base_model={self.base_model!r} fine-tunes the checkpoint's UNet with its own "
                                 f"config; remove unet_preset={self.unet_preset!r} and unet={self.unet!r}")
        elif self.lora is not None:
            raise ValueError("a lora section trains adapters on a base model's frozen UNet: set base_model to an SD "
                             "checkpoint or a run directory of `openldm train`")


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config (plain data) in today's form: ``low_res_factor`` (written by runs before it moved)
    becomes each low_res condition's ``options.factor``."""
    data = dict(data)
    factor = data.pop("low_res_factor", None)
    if factor is not None:
        data["conditions"] = [
            {**c, "options": {"factor": factor, **c.get("options", {})}} if c.get("kind") == "low_res" else c
            for c in data.get("conditions", [])]
    return data




# ---- reading and writing the files ---------------------------------------------------------------------------

def is_run_dir(path: str | Path) -> bool:
    """A directory written by ``openldm train`` (or an exported / bundled run): config.yaml + unet_ema.safetensors."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / UNET_EMA_FILE).is_file()


def read_config(run_dir: str | Path) -> DiffusionTrainConfig:
    """The run's config, older keys upgraded, checked strictly."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a diffusion run directory (no {CONFIG_FILE})")
    return from_dict(DiffusionTrainConfig, upgrade_config(yaml.safe_load(path.read_text())), where=str(path))


def write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1))


def write_config(cfg: Any, out_dir: Path) -> None:
    """``out_dir/config.yaml``: the resolved config (a dataclass or its plain data), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    with atomic_path(out_dir / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def read_data_facts(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``data.json`` (see :func:`data_facts`), None for a run written before runs had one."""
    path = run_dir / DATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_sampling(run_dir: Path) -> dict[str, Any]:
    """The run's recommended sampling settings: ``sampling.json`` over :data:`TRAINED_SAMPLING`."""
    path = run_dir / SAMPLING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(saved, dict):
        raise ValueError(f"{str(path)!r} must hold a mapping of sampling settings, got {saved!r}")
    return {**TRAINED_SAMPLING, **saved}


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint or snapshot."""
    return f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names (the newest complete checkpoint), or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    path = pointer.parent / name
    return path if name.startswith("step_") and path.is_dir() else None


def weights_dir(run_dir: Path, step: int | None, ema: bool) -> Path:
    """Where the weights to load live: the latest whole checkpoint of a training run (so a run killed while its
    top-level links were being replaced still reads one step), the run directory, or the EMA snapshot of
    ``step``."""
    if step is None:
        latest = latest_checkpoint(run_dir)
        return latest if latest is not None and (latest / UNET_EMA_FILE).is_file() else run_dir
    path = run_dir / SNAPSHOTS / step_name(step)
    if not ema or not path.is_dir():
        found = sorted(p.name for p in (run_dir / SNAPSHOTS).glob("step_*")) if ema else []
        raise FileNotFoundError(f"no EMA snapshot of step {step} in {str(run_dir)!r} (snapshots: {found or 'none'}; "
                                "train with snapshot_every=N to keep them)")
    return path


def read_conditioner_weights(path: Path) -> dict[str, torch.Tensor]:
    """A run's ``conditioner.safetensors`` (raw and ``ema.``-prefixed tensors), its header checked first and every
    floating tensor finite: a damaged file is one ValueError naming it."""
    tensors, _ = read_tensors(path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            check_finite(tensor, name, str(path))
    return tensors


def read_scaling_factor(unet_path: Path) -> float:
    """The autoencoder ``scaling_factor`` a run trained with (1 for pixel-space runs), from its UNet file's
    metadata."""
    meta = read_metadata(unet_path)
    return float(meta.get(SCALING_FACTOR_KEY, meta.get(_LEGACY_SCALING_FACTOR_KEY, "1.0")))


def save_weights(out_dir: Path, *, ema_unet: nn.Module, ema_conditioner: dict[str, torch.Tensor],
                 scaling_factor: float, unet: nn.Module | None = None,
                 conditioner: dict[str, torch.Tensor] | None = None) -> None:
    """``unet_ema.safetensors``, ``conditioner.safetensors`` (``ema.``-prefixed, plus the raw weights when given)
    and, with ``unet``, ``unet.safetensors``: the files :func:`is_run_dir` and inference read."""
    extra = {SCALING_FACTOR_KEY: repr(float(scaling_factor))}
    out_dir.mkdir(parents=True, exist_ok=True)
    if unet is not None:
        save_model(unet, out_dir / UNET_FILE, extra)
    save_model(ema_unet, out_dir / UNET_EMA_FILE, extra)
    state = {k: v.detach().contiguous() for k, v in (conditioner or {}).items()}
    state.update({f"ema.{k}": v.detach().contiguous() for k, v in ema_conditioner.items()})
    with atomic_path(out_dir / CONDITIONER_FILE) as tmp:
        save_file(state, str(tmp))


def save_lora(out_dir: Path, *, unet_config, ema_lora: dict[str, torch.Tensor],
              lora: dict[str, torch.Tensor] | None = None) -> None:
    """A LoRA run's weight files: ``lora.safetensors`` (``ema_lora`` in the kohya layout) and, with ``lora`` (the
    raw adapters), ``lora_weights.safetensors`` (raw + ``ema.``-prefixed, openldm names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kohya_lora(ema_lora, out_dir / LORA_FILE, unet_config)
    if lora is not None:
        state = {**{k: v.contiguous() for k, v in lora.items()}, **{f"ema.{k}": v.contiguous() for k, v in ema_lora.items()}}
        with atomic_path(out_dir / LORA_WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))


# ---- model sources ---------------------------------------------------------------------------------------------

def resolve_source(source: str | Path | None) -> Path:
    """A model source as a path: None is the default bundled model, a bundled model's name its folder, anything
    else a path that must exist."""
    from openldm.bundled import BUNDLED, bundled_dir

    if source is None:
        return bundled_dir()
    if str(source) in BUNDLED and not Path(source).exists():
        return bundled_dir(str(source))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model {str(source)!r} does not exist (give a run directory, an SD .safetensors / "
                                f".ckpt file, a diffusers folder, or a bundled model: {', '.join(BUNDLED)})")
    return path


def find_model_sources(root: str | Path) -> list[Path]:
    """Every model under ``root`` (``root`` itself if it is one): run directories, diffusers folders, openldm SD
    folders and single-file checkpoints that are not openldm model files (those are parts of a run)."""
    from openldm.io.components import OPENLDM_INDEX, SINGLE_FILE_SUFFIXES

    root = Path(root)

    def is_folder_model(p: Path) -> bool:
        return is_run_dir(p) or (p / "model_index.json").is_file() or (p / OPENLDM_INDEX).is_file()

    if root.is_file() or is_folder_model(root):
        return [root]
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for p in sorted(folder.iterdir()):
            if p.is_dir():
                if is_folder_model(p):
                    found.append(p)
                elif not p.name.startswith("."):
                    walk(p)
            elif p.suffix.lower() in SINGLE_FILE_SUFFIXES and not _is_openldm_file(p):
                found.append(p)
    walk(root)
    return found


def _is_openldm_file(path: Path) -> bool:
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        return "openldm.kind" in read_metadata(path)
    except Exception:  # not a readable safetensors file: let the loader say what is wrong with it
        return False


# ---- what a run borrows from a Stable Diffusion checkpoint (fine-tuned runs) ------------------------------------

def load_base_model(cfg: DiffusionTrainConfig, path: str | Path | None = None, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The SD v1 checkpoint ``cfg.base_model`` (or ``path``) as ``StableDiffusionComponents`` at ``dtype``, its VAE
    and text encoder frozen (eval, no gradients). Raises when the run's schedule or prediction type is not the
    checkpoint's."""
    from openldm.io.sd import load_sd

    path = cfg.base_model if path is None else path
    sd = load_sd(path, device=device, dtype=dtype)
    if cfg.schedule != sd.schedule or cfg.prediction != sd.prediction:
        raise ValueError(f"base_model {str(path)!r} was trained with schedule {to_dict(sd.schedule)} and prediction "
                         f"{sd.prediction!r}; the config has schedule {to_dict(cfg.schedule)} and prediction "
                         f"{cfg.prediction!r}: set schedule and prediction to the checkpoint's")
    for module in (sd.vae, sd.text_encoder):
        module.eval().requires_grad_(False)
    return sd


@dataclass
class BaseRun:
    """A run directory of ``openldm train`` as the base of a LoRA run: its EMA UNet (what it samples with), its EMA
    conditioner weights, its autoencoder (None in pixel space, else frozen) and latent scale."""

    config: DiffusionTrainConfig
    unet: nn.Module
    conditioner: dict[str, torch.Tensor]
    vae: nn.Module | None
    scaling_factor: float


def load_base_run(cfg: DiffusionTrainConfig, path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> BaseRun:
    """The run directory ``path`` as :class:`BaseRun`, weights at ``dtype`` (an exported run may store float16).
    Raises when ``cfg``'s schedule, prediction or conditions (kinds, names, options) are not the run's."""

    path = Path(path)
    base = read_config(path)
    if base.base_model is not None:
        raise ValueError(f"base_model {str(path)!r} is itself a fine-tuned run of {base.base_model!r}; train the LoRA "
                         "on that checkpoint, or export the run to an SD checkpoint first")
    mine = [{k: v for k, v in to_dict(c).items() if k != "drop_prob"} for c in cfg.conditions]
    theirs = [{k: v for k, v in to_dict(c).items() if k != "drop_prob"} for c in base.conditions]
    if cfg.schedule != base.schedule or cfg.prediction != base.prediction or mine != theirs:
        raise ValueError(f"base_model {str(path)!r} was trained with schedule {to_dict(base.schedule)}, prediction "
                         f"{base.prediction!r} and conditions {theirs}; the config has {to_dict(cfg.schedule)}, "
                         f"{cfg.prediction!r} and {mine}: copy them from the base run's config.yaml")
    folder = weights_dir(path, None, ema=True)
    unet = load_model(folder / UNET_EMA_FILE, device=device, dtype=dtype)
    cond_path = folder / CONDITIONER_FILE
    cond = {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in (read_conditioner_weights(cond_path) if cond_path.is_file() else {}).items()}
    vae = None
    if base.autoencoder is not None:
        vae = load_model(find_in_run(base.autoencoder, path), device=device, dtype=dtype).eval().requires_grad_(False)
    return BaseRun(base, unet, {k[4:]: v for k, v in cond.items() if k.startswith("ema.")}, vae,
                   read_scaling_factor(folder / UNET_EMA_FILE))


def data_facts(data_shape: Sequence[int], image_size: Sequence[int] | None, image_channels: int | None,
               class_names: Sequence[str] | None, crop_size: Sequence[int] | None) -> dict[str, Any]:
    """A run's ``data.json``, the one place its keys are written (training and ``export_run``): ``data_shape``
    (C, h, w) is what the model denoises (latents or the pixels), ``image_size`` / ``image_channels`` the source
    images', ``crop_size`` what outputs are cropped back to."""
    return {"data_shape": [int(s) for s in data_shape],
            "image_size": [int(s) for s in image_size] if image_size else None,
            "image_channels": None if image_channels is None else int(image_channels),
            "class_names": list(class_names) if class_names else None,
            "crop_size": [int(s) for s in crop_size] if crop_size else None}
