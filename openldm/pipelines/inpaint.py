"""Inpainting: redraw the masked region (mask white = fill) of an image after a prompt.

- ordinary (4-channel) checkpoints: after every step the known region is replaced by the image's latents
  noised to the new level (``blend_known`` through the sampler's ``on_step`` hook), as diffusers does;
- inpainting (9-channel) checkpoints: the UNet also sees the concat slot ``[mask, latents of the masked
  image]`` (diffusers' channel order), filled by the registered "inpaint" conditioner.

``paste_back`` copies the original pixels outside the mask onto the result (the autoencoder otherwise alters
them slightly).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image

from openldm.conditioning.inputs import fill_mask
from openldm.pipelines.common import (
    SD_GUIDANCE_SCALE,
    SD_SAMPLER,
    SD_STEPS,
    ModelParts,
    StepCutters,
    chain_hooks,
    denoise_and_decode,
    encode_images,
    encode_text,
    image_to_tensor,
    latent_shape,
    make_generator,
    module_device_dtype,
    paste_unmasked,
    place,
    sampling_plan,
    to_pil,
)
from openldm.pipelines.seeds import SeedVariation, initial_noise
from openldm.registry import CONDITIONERS
from openldm.samplers.base import OnStep, blend_known


def inpaint(parts: ModelParts, prompt: str | Sequence[str], image: Image.Image | str | Path,
            mask: Image.Image | str | Path, *, strength: float = 1.0, paste_back: bool = False,
            negative_prompt: str | Sequence[str] = "", sampler: str = SD_SAMPLER, karras: bool = False,
            steps: int = SD_STEPS, guidance_scale: float = SD_GUIDANCE_SCALE, guidance_rescale: float = 0.0,
            seed: int = 0, height: int | None = None, width: int | None = None, num_images: int = 1, clip_skip: int = 1, chunked: bool = False,
            prompt_weighting: str = "none", embeddings: Mapping[str, torch.Tensor] | None = None,
            device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            vae_tiling: bool = False, progress: bool = True, on_step: OnStep | None = None,
            cutters: StepCutters | None = None, variation: SeedVariation | None = None) -> list[Image.Image]:
    """``image`` with the white region of ``mask`` (grey levels binarised at 0.5) redrawn, as diffusers'
    StableDiffusionInpaintPipeline with the same seed. The kind of UNet (4 or 9 input channels) picks the method.
    ``variation``: A1111's variation seed / seed resize for the starting noise (``openldm.pipelines.seeds``)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    place(parts, device, dtype)
    init = image_to_tensor(image, height, width)  # (1, 3, H, W) in [-1, 1]
    H, W = init.shape[2:]
    fill = fill_mask(mask, (H, W))  # (1, 1, H, W), 1 = redraw
    cond, uncond = encode_text(parts, prompt, negative_prompt, num_images=num_images, clip_skip=clip_skip,
                               chunked=chunked, prompt_weighting=prompt_weighting, embeddings=embeddings)
    shape = latent_shape(parts, cond.context.shape[0], H, W)
    B = shape[0]
    concat_channels = getattr(parts.unet.config, "concat_channels", 0)
    if concat_channels not in (0, 1 + shape[1]):
        raise ValueError(f"the UNet takes {concat_channels} concat channels; inpainting needs 0 (blending) or "
                         f"{1 + shape[1]} (an inpainting checkpoint)")
    device, dtype = module_device_dtype(parts.unet)
    plan = sampling_plan(parts, sampler, steps, karras).from_strength(strength)

    # Random draws in diffusers' order: image posterior, starting noise, masked-image posterior.
    generator = make_generator(seed)
    known = None
    if concat_channels == 0 or strength < 1.0:
        known = encode_images(parts.vae, init, generator, tiling=vae_tiling).to(device, dtype)
        known = known.expand(B, -1, -1, -1)
    noise = initial_noise(shape, generator, device, dtype, seed=seed, variation=variation,
                          factor=int(parts.vae.downsampling_factor))
    x = plan.initial_sample(noise) if strength == 1.0 else plan.noised_input(known, noise)

    hooks = [on_step]
    if concat_channels:
        inpaint_conditioner = CONDITIONERS.get("inpaint")
        conditioner = inpaint_conditioner(inpaint_conditioner.config_class(latent_channels=shape[1]),
                                        encode=lambda masked: encode_images(parts.vae, masked, generator,
                                                                            tiling=vae_tiling))
        concat = conditioner({"image": init, "inpaint_mask": fill}).concat.to(device, dtype)
        concat = concat.expand(B, -1, -1, -1)
        cond, uncond = replace(cond, concat=concat), replace(uncond, concat=concat)
    else:
        small = torch.nn.functional.interpolate(fill, size=shape[2:], mode="nearest").to(device, dtype)
        hooks.insert(0, blend_known(known, small, noise))
    images = denoise_and_decode(parts, x, plan, cond, uncond, sampler=sampler, guidance_scale=guidance_scale,
                                guidance_rescale=guidance_rescale, generator=generator, on_step=chain_hooks(*hooks),
                                vae_tiling=vae_tiling, progress=progress, cutters=cutters)
    if paste_back:
        images = paste_unmasked(images, (init + 1) / 2, fill)
    return to_pil(images)
