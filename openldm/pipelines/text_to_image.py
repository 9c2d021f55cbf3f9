"""Text-to-image: prompt -> context, pure noise at the plan's first level, guided sampling, decode."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from PIL import Image

from openldm.pipelines.common import (
    SD_GUIDANCE_SCALE,
    SD_SAMPLER,
    SD_SIZE,
    SD_STEPS,
    ModelParts,
    StepCutters,
    check_size,
    denoise,
    denoise_and_decode,
    encode_text,
    latent_shape,
    make_generator,
    module_device_dtype,
    place,
    sampling_plan,
    to_pil,
)
from openldm.pipelines.hires import HiresFix, upscale
from openldm.pipelines.image_to_image import redraw
from openldm.pipelines.seeds import SeedVariation, initial_noise
from openldm.samplers.base import OnStep


def text_to_image(parts: ModelParts, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
                  sampler: str = SD_SAMPLER, karras: bool = False, steps: int = SD_STEPS,
                  guidance_scale: float = SD_GUIDANCE_SCALE, guidance_rescale: float = 0.0, seed: int = 0,
                  height: int = SD_SIZE, width: int = SD_SIZE,
                  num_images: int = 1, clip_skip: int = 1, chunked: bool = False,
                  prompt_weighting: str = "none", embeddings: Mapping[str, torch.Tensor] | None = None,
                  device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  vae_tiling: bool = False, progress: bool = True, on_step: OnStep | None = None,
                  cutters: StepCutters | None = None, hires: HiresFix | None = None,
                  variation: SeedVariation | None = None) -> list[Image.Image]:
    """Images for ``prompt`` (``num_images`` per prompt), the same as diffusers' StableDiffusionPipeline with the
    matching scheduler and ``generator=torch.Generator("cpu").manual_seed(seed)``.

    ``device``/``dtype`` move the parts first (in place; None keeps them where they are). ``chunked``: AUTOMATIC1111
    long prompts (see ``encode_text``). ``vae_tiling`` decodes images larger than 512 px in tiles. ``hires``:
    A1111's hires fix, a second pass at ``hires.scale`` times the size (``openldm.pipelines.hires``); ``on_step``
    counts its steps on from the first pass's. ``variation``: A1111's variation seed / seed resize
    (``openldm.pipelines.seeds``), in both passes."""
    place(parts, device, dtype)
    cond, uncond = encode_text(parts, prompt, negative_prompt, num_images=num_images, clip_skip=clip_skip,
                               chunked=chunked, prompt_weighting=prompt_weighting, embeddings=embeddings)
    shape = latent_shape(parts, cond.context.shape[0], height, width)
    plan = sampling_plan(parts, sampler, steps, karras)
    generator = make_generator(seed)
    x = plan.initial_sample(initial_noise(shape, generator, *module_device_dtype(parts.unet), seed=seed,
                                          variation=variation, factor=int(parts.vae.downsampling_factor)))
    guidance = dict(sampler=sampler, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                    generator=generator, progress=progress, cutters=cutters)
    if hires is None:
        return to_pil(denoise_and_decode(parts, x, plan, cond, uncond, on_step=on_step, vae_tiling=vae_tiling,
                                         **guidance))
    latents = denoise(parts, x, plan, cond, uncond, on_step=on_step, **guidance)
    hires_width, hires_height = hires.size(width, height)
    check_size(hires_height, hires_width, int(parts.vae.downsampling_factor))
    guidance["generator"] = make_generator(seed)  # the second pass starts from the seed again, as in A1111
    known = upscale(parts, latents, hires_width, hires_height, hires.upscaler, guidance["generator"],
                    vae_tiling=vae_tiling)
    first = plan.num_steps
    second_step = None if on_step is None else lambda i, *rest: on_step(i + first, *rest)
    return to_pil(redraw(parts, known, cond, uncond, strength=hires.strength, karras=karras,
                         steps=hires.steps or steps, vae_tiling=vae_tiling, on_step=second_step, seed=seed,
                         variation=variation, **guidance))
