"""Image-to-image (SDEdit, Meng et al. 2022): encode the image, noise it to the level ``strength`` of the way up
the schedule, and sample the rest of the way down."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image

from openldm.nn.slots import Slots
from openldm.pipelines.common import (
    SD_GUIDANCE_SCALE,
    SD_SAMPLER,
    SD_STEPS,
    ModelParts,
    StepCutters,
    decode_latents,
    denoise_and_decode,
    encode_images,
    encode_text,
    image_to_tensor,
    latent_shape,
    make_generator,
    module_device_dtype,
    place,
    sampling_plan,
    to_pil,
)
from openldm.pipelines.seeds import SeedVariation, initial_noise
from openldm.samplers.base import OnStep


def image_to_image(parts: ModelParts, prompt: str | Sequence[str], image: Image.Image | str | Path, *,
                   strength: float = 0.75, negative_prompt: str | Sequence[str] = "", sampler: str = SD_SAMPLER,
                   karras: bool = False, steps: int = SD_STEPS, guidance_scale: float = SD_GUIDANCE_SCALE,
                   guidance_rescale: float = 0.0, seed: int = 0, height: int | None = None, width: int | None = None, num_images: int = 1,
                   clip_skip: int = 1, chunked: bool = False, prompt_weighting: str = "none",
                   embeddings: Mapping[str, torch.Tensor] | None = None, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, vae_tiling: bool = False, progress: bool = True,
                   on_step: OnStep | None = None, cutters: StepCutters | None = None,
                   variation: SeedVariation | None = None) -> list[Image.Image]:
    """``image`` redrawn after ``prompt``, as diffusers' StableDiffusionImg2ImgPipeline with the same seed: of
    ``steps`` steps the last ``int(steps * strength)`` run. ``strength=0`` returns the autoencoder round trip of
    the image. ``height``/``width`` resize the image (default: its own size, a multiple of 8). ``variation``:
    A1111's variation seed / seed resize for the added noise (``openldm.pipelines.seeds``)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    place(parts, device, dtype)
    init = image_to_tensor(image, height, width)  # (1, 3, H, W) in [-1, 1]
    cond, uncond = encode_text(parts, prompt, negative_prompt, num_images=num_images, clip_skip=clip_skip,
                               chunked=chunked, prompt_weighting=prompt_weighting, embeddings=embeddings)
    shape = latent_shape(parts, cond.context.shape[0], init.shape[2], init.shape[3])
    generator = make_generator(seed)
    known = encode_images(parts.vae, init, generator, tiling=vae_tiling).expand(shape[0], -1, -1, -1)
    return to_pil(redraw(parts, known, cond, uncond, strength=strength, sampler=sampler, karras=karras, steps=steps,
                         guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator,
                         vae_tiling=vae_tiling, progress=progress, on_step=on_step, cutters=cutters, seed=seed,
                         variation=variation))


def redraw(parts: ModelParts, known: torch.Tensor, cond: Slots, uncond: Slots, *, strength: float, sampler: str,
           karras: bool, steps: int, guidance_scale: float, guidance_rescale: float, generator: torch.Generator,
           vae_tiling: bool = False, progress: bool = True, on_step: OnStep | None = None,
           cutters: StepCutters | None = None, seed: int = 0,
           variation: SeedVariation | None = None) -> torch.Tensor:
    """The latents ``known`` noised to ``strength`` of the way up the schedule of ``steps`` (noise from
    ``generator``, or per image from ``seed`` and ``variation``), sampled back down and decoded: images (B, 3, H, W)
    in [0, 1]; at strength 0, ``known`` decoded."""
    if strength == 0.0:
        return decode_latents(parts.vae, known, tiling=vae_tiling)
    plan = sampling_plan(parts, sampler, steps, karras).from_strength(strength)
    noise = initial_noise(known.shape, generator, *module_device_dtype(parts.unet), seed=seed, variation=variation,
                          factor=int(parts.vae.downsampling_factor))
    x = plan.noised_input(known.to(noise.device, noise.dtype), noise)
    return denoise_and_decode(parts, x, plan, cond, uncond, sampler=sampler, guidance_scale=guidance_scale,
                              guidance_rescale=guidance_rescale, generator=generator, on_step=on_step,
                              vae_tiling=vae_tiling, progress=progress, cutters=cutters)
