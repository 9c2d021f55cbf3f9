"""Stable Diffusion weights behind the generation interface (``openldm.pipelines.generate``)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from openldm.pipelines.common import decode_latents, module_device_dtype, place, sampling_plan, to_pil
from openldm.pipelines.generate import (
    Capabilities,
    GenerationRequest,
    GenerationResult,
    OnProgress,
    Recommended,
    ShouldStop,
    Stopped,
    bytes_per_pixel,
    params_for,
    progress_hook,
)
from openldm.pipelines.image_to_image import image_to_image
from openldm.pipelines.inpaint import inpaint
from openldm.pipelines.text_to_image import text_to_image

# Latents -> RGB by one linear map: A1111's "Approx cheap" live preview of SD v1 latents (4 channels).
_SD_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                               [-0.184, -0.271, -0.473]])


class SDGenerator:
    """A loaded SD v1-family checkpoint (text-to-image, image-to-image, inpainting)."""

    def __init__(self, parts, source: str):
        self.parts = parts
        from openldm.registry import SAMPLERS

        self.capabilities = Capabilities(
            name=Path(source).stem if Path(source).is_file() else Path(source).name, kind="stable-diffusion",
            source=str(source), prompt=True, negative_prompt=True, class_names=None, num_classes=None, inputs=(),
            image_to_image=True, inpainting=True, channels=3, size_multiple=int(parts.vae.downsampling_factor),
            samplers=tuple(SAMPLERS.names()), recommended=Recommended(),
            max_steps=int(getattr(parts.schedule, "num_train_steps", 1000)),
            max_clip_skip=int(parts.text_encoder.config.num_hidden_layers), chunked_prompts=True, vae_tiling=True,
            device=str(module_device_dtype(parts.unet)[0]), **bytes_per_pixel(parts.unet, parts.vae))

    @classmethod
    def load(cls, path: str | Path, source: str | None = None, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
             unsafe_load: bool = False) -> "SDGenerator":
        from openldm.io.sd import load_sd

        parts = load_sd(path, device=device, unsafe_load=unsafe_load)
        place(parts, device, dtype)  # once, at load: requests never move or cast the modules
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.eval().requires_grad_(False)
        return cls(parts, str(path) if source is None else source)

    def generate(self, request: GenerationRequest, *, on_progress: OnProgress | None = None,
                 should_stop: ShouldStop | None = None, progress: bool = False) -> GenerationResult:
        r = request.resolve(self.capabilities)
        strength = r.strength if r.strength is not None else (1.0 if r.mask is not None else 0.75)
        plan = sampling_plan(self.parts, r.sampler, r.steps, r.karras)
        total = plan.from_strength(strength).num_steps if r.init_image is not None and strength > 0 else plan.num_steps
        common = dict(negative_prompt=r.negative_prompt, sampler=r.sampler, karras=r.karras, steps=r.steps,
                      guidance_scale=r.guidance_scale, guidance_rescale=r.guidance_rescale, seed=r.seed,
                      num_images=r.num_images, clip_skip=r.clip_skip, chunked=r.chunked, vae_tiling=r.vae_tiling,
                      progress=progress, on_step=progress_hook(total, on_progress, should_stop))
        interrupted = False
        try:
            if r.mask is not None:
                images = inpaint(self.parts, r.prompt, r.init_image, r.mask, strength=strength,
                                 paste_back=r.paste_back, height=r.height, width=r.width, **common)
            elif r.init_image is not None:
                images = image_to_image(self.parts, r.prompt, r.init_image, strength=strength, height=r.height,
                                        width=r.width, **common)
            else:
                images = text_to_image(self.parts, r.prompt, height=r.height, width=r.width, **common)
        except Stopped as stop:
            images, interrupted = to_pil(decode_latents(self.parts.vae, stop.denoised, tiling=r.vae_tiling)), True
        if r.init_image is not None:
            r.strength = strength
        params = params_for(r, self.capabilities.source, len(images), images[0].width, images[0].height)
        return GenerationResult(images, params, interrupted)

    def preview(self, denoised: torch.Tensor) -> Image.Image:
        """The first image of a batch of latents, cheaply: a linear map for SD's 4 channels, else a decode."""
        z = denoised[:1].float().cpu()
        if z.shape[1] != 4:
            return to_pil(decode_latents(self.parts.vae, z))[0]
        rgb = torch.einsum("bchw,cr->brhw", z, _SD_LATENT_RGB)
        return to_pil(((rgb + 1) / 2).clamp(0, 1))[0]
