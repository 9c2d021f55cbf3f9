"""Sampling from diffusion models trained here: :func:`load_run` rebuilds a run directory of
``openldm.training.diffusion`` (UNet, conditioner, schedule, autoencoder) from that directory alone, and
:func:`sample_trained` draws images for any mix of the conditions the model was trained with.

Each input goes to the conditioner that reads it, under the batch key that conditioner is configured with:
``class_label`` -> "class_label", ``prompt`` -> "text", ``mask`` -> "segmentation" (a label map), ``low_res`` ->
"low_res", ``init_image`` + ``mask`` -> "inpaint" (mask white = fill). A condition the model has but the call does
not give gets its null slots (the model's unconditional input for it). ``init_image`` + ``mask`` on a model without
an inpainting conditioner inpaints by blending (``blend_known``), and ``init_image`` with ``strength < 1`` starts
from the noised image (image-to-image).

Seed convention (that of ``pipelines.common``): one CPU generator seeded with ``seed`` draws the starting noise for
the whole batch first, then any noise the conditioners draw (low-res noise augmentation), then the sampler's noise;
so for one seed the starting noise is the same whatever the condition. Images are (B, C, H, W) in [-1, 1], the
datasets' convention, so ``openldm.data`` pixel detectors apply to samples directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn
from torch.nn import functional as F

from openldm.conditioning.compose import (
    ComposedConditioner,
    RequestContext,
    Resources,
    build_conditioning,
    latent_resources,
    merge_slots,
)
from openldm.conditioning.inputs import ImageInput, as_images, batched, fill_mask
from openldm.conditioning.text import base_resources
from openldm.data.transforms import crop_center
from openldm.diffusion.schedules import ScheduleConfig
from openldm.io import run_dir as runs
from openldm.io.native import load_model, save_model
from openldm.io.run_dir import DiffusionTrainConfig, load_base_model
from openldm.models.autoencoder import LatentCodec, latent_channels
from openldm.nn.slots import Slots
from openldm.pipelines.common import (
    StepCutters,
    chain_hooks,
    check_size,
    guided_denoiser,
    make_generator,
    module_device_dtype,
    run_sampler,
    sampling_plan,
)
from openldm.pipelines.seeds import SeedVariation, initial_noise
from openldm.samplers.base import OnStep, blend_known


@dataclass
class TrainedModel:
    """A trained run, ready to sample. ``data_shape`` (C, h, w) is the tensor being denoised (latents or pixels);
    None when the training data could not be probed (then give ``height``/``width`` to :func:`sample_trained`).
    ``spacing``/``steps_offset``: the inference timestep spacing (``make_plan``); "trailing" starts at the last
    training timestep, where the starting noise matches what the model was trained on."""

    unet: nn.Module
    conditioner: ComposedConditioner
    schedule: ScheduleConfig
    prediction: str
    autoencoder: nn.Module | None
    scaling_factor: float
    data_shape: tuple[int, int, int] | None
    config: DiffusionTrainConfig
    class_names: list[str] | None = None
    spacing: str = "trailing"
    steps_offset: int = 0
    run_dir: Path | None = None
    ema: bool = True
    image_channels: int | None = None
    crop_size: tuple[int, int] | None = None

    @property
    def downsampling_factor(self) -> int:
        return 1 if self.autoencoder is None else int(self.autoencoder.downsampling_factor)

    @property
    def channels(self) -> int:
        """Channels of the images the model makes (1 for greyscale data)."""
        if self.image_channels is not None:
            return int(self.image_channels)
        return int((self.autoencoder.config if self.autoencoder is not None else self.unet.config).in_channels)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the images the model was trained on."""
        if self.data_shape is None:
            return None
        f = self.downsampling_factor
        return self.data_shape[1] * f, self.data_shape[2] * f


# --------------------------------------------------------------------------------------------------- loading

def _probe_data_facts(cfg: DiffusionTrainConfig, channels: int, f: int) -> dict[str, Any]:
    """What ``data.json`` would say, for a run written before runs had one: probed from its dataset config (empty
    when the data is not available here)."""
    from openldm.data import build_dataset

    try:
        dataset = build_dataset(cfg.data.name, cfg.data.options)
        item = dataset[0]
    except (OSError, ValueError, IndexError, KeyError):
        return {}
    shape = item["latent"].shape if "latent" in item else (channels, *(s // f for s in item["image"].shape[-2:]))
    names = list(getattr(dataset, "class_names", None) or []) or None
    return {"data_shape": [int(s) for s in shape], "class_names": names}


def load_run(run_dir: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
             autoencoder: str | Path | None = None, resources: Resources | None = None,
             dtype: torch.dtype = torch.float32, step: int | None = None,
             base_model: str | Path | None = None) -> TrainedModel:
    """Rebuild a diffusion run from its directory: ``config.yaml``, ``unet_ema.safetensors`` (``ema=True``) or
    ``unet.safetensors``, ``conditioner.safetensors`` (its ``ema.`` weights or the raw ones) and the autoencoder the
    config names (``autoencoder`` overrides its path). ``resources``: what a conditioner needs that the run cannot
    hold, e.g. ``Resources(prompt_encoder=...)`` for the text backend "external"; an ``encode`` is filled in from
    the autoencoder when absent. Weights are cast to ``dtype`` (an exported run may store float16). ``step``: the
    EMA snapshot of that training step (``snapshot_every``) instead of the last weights.

    A fine-tuned Stable Diffusion run (``base_model`` in its config; the argument overrides the path) takes its VAE
    and frozen CLIP text encoder + tokenizer (for the text backend "external") from that checkpoint, and samples
    with the checkpoint's timestep spacing and offset."""
    run_dir = Path(run_dir)
    cfg = runs.read_config(run_dir)
    if cfg.lora is not None:
        raise ValueError(f"{str(run_dir)!r} is a LoRA run: it holds adapters ({runs.LORA_FILE}, kohya layout), not a "
                         f"model; generate with its base model {cfg.base_model!r} and --lora "
                         f"{str(run_dir / runs.LORA_FILE)!r}")
    weights_dir = runs.weights_dir(run_dir, step, ema)
    unet_path = weights_dir / (runs.UNET_EMA_FILE if ema else runs.UNET_FILE)
    if not unet_path.is_file():
        raise FileNotFoundError(f"{str(unet_path)!r} does not exist; the run has not saved a checkpoint yet")
    unet = load_model(unet_path, device=device, dtype=dtype).eval()
    scale = runs.read_scaling_factor(unet_path)

    ae, spacing = None, {}
    if cfg.base_model is not None:
        path = base_model if base_model is not None else runs.find_in_run(cfg.base_model, run_dir, "base_model")
        sd = load_base_model(cfg, path, device=device, dtype=dtype)
        ae, resources, spacing = sd.vae, base_resources(sd, resources), {"spacing": sd.spacing,
                                                                          "steps_offset": sd.steps_offset}
    elif autoencoder is not None or cfg.autoencoder is not None:
        ae_path = Path(autoencoder) if autoencoder is not None else runs.find_in_run(cfg.autoencoder, run_dir)
        ae = _load_autoencoder(ae_path, device, dtype)
    located = replace(resources or Resources(), run_dir=Path(run_dir))  # files the conditions name: in the run first
    conditioner = build_conditioning(cfg.conditions, latent_resources(located, ae, scale))
    cond_path = weights_dir / runs.CONDITIONER_FILE
    if cond_path.is_file():
        state = runs.read_conditioner_weights(cond_path)
        prefix = "ema." if ema else ""
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and (ema or not k.startswith("ema."))}
        conditioner.load_state_dict(picked, strict=True)
    elif conditioner.state_dict():
        raise FileNotFoundError(f"{str(cond_path)!r} does not exist but the run's conditioner has weights")
    conditioner.to(device).eval().requires_grad_(False)

    f = 1 if ae is None else int(ae.downsampling_factor)
    facts = runs.read_data_facts(run_dir)
    if facts is None:
        facts = _probe_data_facts(cfg, unet.config.in_channels, f)
    shape, crop = facts.get("data_shape"), facts.get("crop_size")
    if autoencoder is not None and ae is not None and shape and latent_channels(ae) != shape[0]:
        raise ValueError(f"autoencoder {str(autoencoder)!r} has {latent_channels(ae)} latent channels but "
                         f"the run was trained on {shape[0]}-channel latents; give an autoencoder with the run's "
                         "encoder (e.g. its decoder fine-tuned with decoder_only)")
    return TrainedModel(unet=unet, conditioner=conditioner, schedule=cfg.schedule, prediction=cfg.prediction,
                        autoencoder=ae, scaling_factor=scale, data_shape=tuple(shape) if shape else None, config=cfg,
                        class_names=facts.get("class_names"), run_dir=run_dir, ema=ema,
                        image_channels=facts.get("image_channels"), crop_size=tuple(crop) if crop else None,
                        **spacing)


def _load_autoencoder(path: Path, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The autoencoder file of a run (or given in its place, ``--vae``); one error naming it when it is none."""
    from safetensors import SafetensorError

    if path.is_dir():
        raise ValueError(f"autoencoder {str(path)!r} is a directory; give an openldm autoencoder .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder {str(path)!r} does not exist")
    try:
        ae = load_model(path, device=device, dtype=dtype)
    except SafetensorError as e:
        raise ValueError(f"autoencoder {str(path)!r} is not a model file (safetensors: {e}); give an openldm "
                         "autoencoder .safetensors") from None
    if not hasattr(ae, "downsampling_factor"):
        raise ValueError(f"autoencoder {str(path)!r} holds a {type(ae).__name__}, not an autoencoder")
    return ae.eval()


# ---------------------------------------------------------------------------------------------------- inputs

def _conditions_batch(model: TrainedModel, B: int, image_size: tuple[int, int], *, per: int,
                      values: dict[str, Any]) -> tuple[dict, set[str]]:
    """The batch dict the model's conditioners read, and the names of the conditions it fills: each conditioner
    builds its own entries from the request's values (``Conditioner.request_batch``)."""
    ctx = RequestContext(batch_size=B, per=per, image_size=image_size, image_channels=model.channels,
                         class_names=model.class_names)
    batch: dict[str, Any] = {}
    given: set[str] = set()
    used: set[str] = set()
    for name, c in model.conditioner.conditioners.items():
        entries = c.request_batch(values, ctx)
        if entries is None:
            continue
        batch.update(entries)
        used |= {f.name for f in c.request_fields()}
        given.add(name)
    for what in ("class_label", "prompt", "low_res"):
        if values.get(what) is not None and what not in used:
            raise ValueError(f"{what} was given but the model has no condition that reads it; its conditions are "
                             f"{_describe(model)}")
    if values.get("noise_level") is not None and values.get("low_res") is None:
        raise ValueError("noise_level is the augmentation level of a low_res image; give low_res too")
    if values.get("mask") is not None and values.get("init_image") is None and "mask" not in used:
        raise ValueError(f"mask was given without init_image, but the model has no segmentation condition; its "
                         f"conditions are {_describe(model)} (give init_image too to inpaint)")
    for key, value in batch.items():
        size = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else len(value) if isinstance(value, list) else B
        if size != B:
            raise ValueError(f"the inputs for {key!r} make {size} rows but the batch has {B}; give one value or the "
                             "same number of class labels and prompts")
    return batch, given


def _describe(model: TrainedModel) -> str:
    return ", ".join(f"{n} ({type(c).__name__})" for n, c in model.conditioner.conditioners.items()) or "none"


def _batch_size(class_label, prompt, num_images: int, mask: Any = None, images: Sequence[Any] = ()) -> int:
    """B: ``num_images`` per class label / prompt. Batched tensor inputs (a mask (N, H, W) / (N, 1, H, W), images
    (N, C, H, W)) with N > 1 give one image per row, N agreeing with the labels' and prompts' count."""
    counts = {1 if v is None or isinstance(v, (int, str)) else len(v) for v in (class_label, prompt)} - {1}
    if len(counts) > 1:
        raise ValueError(f"class_label and prompt lists have different lengths {sorted(counts)}")
    rows = {int(x.shape[0]) for x in images if isinstance(x, torch.Tensor) and x.dim() == 4}
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4):
        rows.add(int(mask.shape[0]))
    rows -= {1}
    if rows:
        if len(rows | counts) > 1:
            raise ValueError(f"batched inputs have {sorted(rows)} rows and labels/prompts {sorted(counts) or [1]}; "
                             "give the same number of each")
        if num_images != 1:
            raise ValueError("num_images must be 1 with batched image inputs (one image per input row)")
        return rows.pop()
    return (counts.pop() if counts else 1) * num_images


def condition(conditioner: ComposedConditioner, batch: dict, given: set[str], batch_size: int,
              latent_size: tuple[int, int], generator: torch.Generator | None) -> Slots:
    """The conditional slots: the conditions named in ``given`` from ``batch``, every other one null."""
    with torch.no_grad():
        return merge_slots([c(batch, generator=generator, latent_size=latent_size) if name in given
                            else c.null(batch_size, latent_size=latent_size)
                            for name, c in conditioner.conditioners.items()])


# --------------------------------------------------------------------------------------------------- sampling

def encode(model: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> what the model denoises (scaled latents, or the pixels themselves)."""
    device, _ = module_device_dtype(model.unet)
    if model.autoencoder is None:
        return images.to(device, torch.float32)
    return LatentCodec(model.autoencoder, model.scaling_factor).encode(images).to(device)


def decode(model: TrainedModel, x: torch.Tensor) -> torch.Tensor:
    """What the model denoises -> images (B, C, H, W) in [-1, 1], float32 on the CPU. Latents are divided by the
    run's scale (training multiplied the posterior mode by it) and decoded."""
    if model.autoencoder is not None:
        x = LatentCodec(model.autoencoder, model.scaling_factor).decode(x)
    return x.float().cpu().clamp(-1, 1)


def sample_trained(model: TrainedModel, *, class_label: int | str | Sequence[int | str] | None = None,
                   prompt: str | Sequence[str] | None = None, mask: ImageInput | None = None,
                   low_res: ImageInput | None = None, noise_level: int | None = None,
                   init_image: ImageInput | None = None, strength: float = 1.0, num_images: int = 1,
                   sampler: str = runs.TRAINED_SAMPLING["sampler"], karras: bool = False,
                   steps: int = runs.TRAINED_SAMPLING["steps"],
                   guidance_scale: float = runs.TRAINED_SAMPLING["guidance_scale"],
                   guidance_rescale: float = 0.0, seed: int = 0, height: int | None = None,
                   width: int | None = None, crop: bool = True, progress: bool = False,
                   on_step: OnStep | None = None, inputs: dict[str, Any] | None = None,
                   cutters: StepCutters | None = None, variation: SeedVariation | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] from a trained model; B = ``num_images`` per class label / prompt (a list of
    labels or prompts gives ``num_images`` each, label-major). Samples at the training size come back cropped to
    the dataset's own size when its images were padded (Fashion-MNIST 28 px padded to 32), unless ``crop=False``.

    ``mask``: a segmentation label map, or with ``init_image`` the region to redraw (white). ``low_res``: the image to
    upscale (``noise_level``: its augmentation level; default the conditioner's). ``strength`` < 1 with
    ``init_image``: start from the image noised to that fraction of the schedule. Classifier-free guidance pairs the
    conditions with the conditioner's null (Ho & Salimans 2022); at ``guidance_scale <= 1`` only the conditional pass
    runs. ``height``/``width`` default to the training images' size. ``inputs``: values for other conditions'
    request fields by name (``Conditioner.request_fields``, e.g. ``{"brightness": 0.8}``). ``variation``: A1111's
    variation seed / seed resize for the starting noise (``openldm.pipelines.seeds``)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if strength < 1.0 and init_image is None:
        raise ValueError(f"strength={strength} needs an init_image to start from")
    f = model.downsampling_factor
    if height is None or width is None:
        if model.image_size is None:
            raise ValueError("the run's training data is not available to tell the image size; give height and width")
        height, width = height or model.image_size[0], width or model.image_size[1]
    check_size(height, width, f)
    latent_size = (height // f, width // f)
    channels = model.unet.config.in_channels
    B = _batch_size(class_label, prompt, num_images, mask, (low_res, init_image))
    device, _ = module_device_dtype(model.unet)

    generator = make_generator(seed)
    noise = initial_noise((B, channels, *latent_size), generator, device, torch.float32, seed=seed,
                          variation=variation, factor=f)
    values = {**(inputs or {}), "class_label": class_label, "prompt": prompt, "mask": mask, "low_res": low_res,
              "noise_level": noise_level, "init_image": init_image}
    batch, given = _conditions_batch(model, B, (height, width), per=num_images, values=values)
    cond = condition(model.conditioner, batch, given, B, latent_size, generator).to(device=device)
    uncond = model.conditioner.null(B, latent_size=latent_size).to(device=device) if given else cond

    plan = sampling_plan(model, sampler, steps, karras)
    hooks = [on_step]
    reads_init_image = any(f.name == "init_image" for c in model.conditioner.conditioners.values()
                           for f in c.request_fields())
    if init_image is not None and not reads_init_image:
        known = encode(model, batched(as_images(init_image, model.channels, (height, width), "init_image"), B,
                                        "init_image"))
        if strength < 1.0:
            plan = plan.from_strength(strength)
        x = plan.noised_input(known, noise) if strength < 1.0 else plan.initial_sample(noise)
        if mask is not None:  # inpainting by blending: the known region is put back after every step
            small = F.interpolate(batched(fill_mask(mask, (height, width)), B, "mask"), size=latent_size,
                                  mode="nearest").to(device)
            hooks.insert(0, blend_known(known, small, noise))
    else:
        if strength < 1.0:
            raise ValueError("strength < 1 is for image-to-image; an inpainting model redraws the mask from noise")
        x = plan.initial_sample(noise)
    # no condition given: cond == uncond, and guidance would change nothing
    denoiser = guided_denoiser(model, plan, uncond, guidance_scale if given else 1.0, guidance_rescale, cutters)
    out = run_sampler(sampler, denoiser, x, plan, cond, generator, on_step=chain_hooks(*hooks), progress=progress)
    images = decode(model, out)
    return crop_output(model, images) if crop else images


def crop_output(model: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """Images at the training size cropped back to the dataset's own size when its images were padded
    (Fashion-MNIST: 28 px padded to 32); other sizes as they are."""
    if model.crop_size is not None and tuple(images.shape[-2:]) == model.image_size:
        return crop_center(images, model.crop_size)
    return images


# ----------------------------------------------------------------------------------------------------- export

def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float16,
               autoencoder: str | Path | None = None) -> Path:
    """Copy what sampling needs from a run into ``out_dir``: ``config.yaml`` (its autoencoder and any CLIP text
    tower renamed to the copies beside it), ``data.json``, the EMA UNet and conditioner weights, the autoencoder and
    the CLIP text towers the conditions name (``text_encoder.safetensors``), floating-point tensors cast
    to ``dtype`` (float16 halves the size; :func:`load_run` casts back to float32). Optimiser state, raw weights and
    logs stay behind. Returns ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if runs.read_config(run_dir).base_model:
        raise ValueError(f"{str(run_dir)!r} fine-tunes a Stable Diffusion checkpoint (base_model); export_run packs "
                         "models trained here with their own autoencoder. Convert the run's UNet with `openldm "
                         "convert` or copy the run directory and keep its base checkpoint")
    model = load_run(run_dir, autoencoder=autoencoder)
    if model.data_shape is None:
        raise ValueError(f"{str(run_dir)!r} has no data.json and its data cannot be probed here; an exported run "
                         "must carry its data facts")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = runs.upgrade_config(yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text()))  # today's keys only
    if model.autoencoder is not None:
        cfg["autoencoder"] = "autoencoder.safetensors"
        save_model(model.autoencoder.to(dtype), out_dir / "autoencoder.safetensors", {"openldm.source": "exported"})
    for i, cond in enumerate(cfg.get("conditions") or []):
        options = cond.get("options") or {}
        if options.get("backend") == "clip":  # a frozen CLIP text tower lives in a file of its own: carry a copy
            name = "text_encoder.safetensors" if i == 0 else f"text_encoder_{i}.safetensors"
            tower = load_model(runs.find_in_run(options["path"], run_dir, "text encoder"), dtype=dtype)
            save_model(tower, out_dir / name, {"openldm.source": "exported"})
            options["path"] = name
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.conditioner.state_dict().items()}
    runs.save_weights(out_dir, ema_unet=model.unet.to(dtype), ema_conditioner=cast, scaling_factor=model.scaling_factor)
    runs.write_config(cfg, out_dir)
    runs.write_json(out_dir / runs.DATA_FILE, runs.data_facts(model.data_shape, model.image_size, model.channels,
                                                               model.class_names, model.crop_size))
    if (run_dir / runs.SAMPLING_FILE).is_file():
        runs.write_json(out_dir / runs.SAMPLING_FILE, json.loads((run_dir / runs.SAMPLING_FILE).read_text()))
    return out_dir


__all__ = ["TrainedModel", "export_run", "load_run", "sample_trained", "condition", "encode", "decode"]
