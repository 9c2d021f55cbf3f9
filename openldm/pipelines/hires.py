"""Hires fix, AUTOMATIC1111's two-pass text-to-image: sample at the requested size, upscale the result by ``scale``
(in latent space, or decoded, resized as pixels and encoded again), then redraw it at the larger size as
image-to-image does, at ``strength`` of the way up the schedule. The second pass draws its noise (and, for the pixel
upscalers, the encoder's) from a generator seeded again with the request's seed, as A1111 seeds both passes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.pipelines.common import (
    ModelParts,
    RequestError,
    decode_latents,
    encode_images,
    image_to_tensor,
    to_pil,
)

# A1111's latent upscalers (interpolation mode, antialias) and its built-in pixel ones ("None" resizes with Lanczos)
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                   "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's default
DEFAULT_STRENGTH = 0.75  # A1111's txt2img denoising_strength
MAX_SCALE = 4.0


@dataclass(frozen=True)
class HiresFix:
    """The second pass: ``scale`` (1 to 4; 1 redraws at the same size), ``upscaler`` (one of :data:`UPSCALERS`),
    ``steps`` (None: the first pass's; of them the last ``int(steps * strength)`` run) and ``strength`` in [0, 1].
    A value out of range raises RequestError naming the request field."""

    scale: float = 2.0
    upscaler: str = DEFAULT_UPSCALER
    steps: int | None = None
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self):
        if not _number_in(self.scale, 1, MAX_SCALE):
            raise RequestError("hires_scale", f"hires_scale={self.scale!r} must be a number in [1, {MAX_SCALE:g}]")
        if self.upscaler not in UPSCALERS:
            raise RequestError("hires_upscaler", f"hires upscaler {self.upscaler!r} is not one of "
                               f"{', '.join(UPSCALERS)}")
        if not _number_in(self.strength, 0, 1):
            raise RequestError("strength", f"the hires pass's strength={self.strength!r} must be in [0, 1]")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's (width, height) for a first pass of ``width`` x ``height``."""
        return hires_size(width, height, self.scale)


def _number_in(value: object, low: float, high: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``width`` x ``height`` times ``scale``, whole (A1111 truncates; rounding gives the same sizes wherever they
    are whole, without float error's 1999.9999 -> 1999)."""
    return round(width * scale), round(height * scale)


def upscale(parts: ModelParts, latents: torch.Tensor, width: int, height: int, upscaler: str,
            generator: torch.Generator, *, vae_tiling: bool = False) -> torch.Tensor:
    """First-pass ``latents`` as latents of ``width`` x ``height`` images: interpolated for the latent upscalers;
    decoded, resized and encoded (posterior noise from ``generator``) for the pixel ones."""
    factor = int(parts.vae.downsampling_factor)
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        return F.interpolate(latents, size=(height // factor, width // factor), mode=mode, antialias=antialias)
    images = to_pil(decode_latents(parts.vae, latents, tiling=vae_tiling))
    resized = [image.resize((width, height), PIXEL_UPSCALERS[upscaler]) for image in images]
    pixels = torch.cat([image_to_tensor(image, factor=factor) for image in resized])
    return encode_images(parts.vae, pixels, generator, tiling=vae_tiling)
