"""A1111's variation seeds and seed resize: the starting noise of an image moved part of the way towards another
seed's, or kept from the noise of another image size.

A request without them keeps the seed convention of ``openldm.pipelines.common`` (one generator for the batch).
With them, the noise is drawn per image as A1111 draws it: image ``i`` of a batch has the seed ``seed`` (``seed +
i`` when only the size is resized) and the variation seed ``subseed + i``, each noise a float32
``randn(C, H, W)`` from a CPU generator of its own, so that a batch shows variations of one image. The variation
is A1111's spherical interpolation (``slerp``) from the seed's noise towards the variation seed's; the resized
noise is the seed's noise at ``resize_from``'s latent size, centred in the seed's noise at the image's size
(cropped where it is larger). The sampler's later draws (ancestral samplers) come from the batch's generator.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openldm.pipelines.common import draw_noise, make_generator


@dataclass(frozen=True)
class SeedVariation:
    """``strength`` of the way (0..1) from the seed's noise to ``subseed``'s; ``resize_from``: the (width, height)
    in pixels whose noise to keep (None: the image's own size)."""

    subseed: int = 0
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.subseed, bool) or not isinstance(self.subseed, int) or not 0 <= self.subseed < 2**64:
            raise ValueError(f"subseed={self.subseed!r} must be an integer in [0, 2^64)")
        if not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength) \
                or not 0 <= self.strength <= 1:
            raise ValueError(f"subseed_strength={self.strength!r} must be in [0, 1]")
        if self.resize_from is not None and (len(self.resize_from) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.resize_from)):
            raise ValueError(f"seed_resize_from={self.resize_from!r} must be a (width, height) of positive integers")

    @property
    def active(self) -> bool:
        """Whether the noise differs from the plain seed's."""
        return self.strength > 0 or self.resize_from is not None


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of one image's noise (C, H, W): along each column (over H) of each channel,
    ``t`` of the angle from ``low`` to ``high``; linear where the two are (nearly) the same direction."""
    low_dir = low / low.norm(dim=1, keepdim=True)
    high_dir = high / high.norm(dim=1, keepdim=True)
    dot = (low_dir * high_dir).sum(1)
    if dot.mean() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot)
    return ((torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low
            + (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high)


def _centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """``big`` with ``small`` laid over its centre, ``small`` cropped where it is larger (A1111's offsets: a
    larger ``small`` loses ``(h - H) // 2`` rounded away from zero on each side)."""
    out = big.clone()
    (_, h, w), (_, H, W) = small.shape, big.shape
    dy, dx = (H - h) // 2, (W - w) // 2
    rows, cols = (h if dy >= 0 else h + 2 * dy), (w if dx >= 0 else w + 2 * dx)
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty:ty + rows, tx:tx + cols] = small[:, sy:sy + rows, sx:sx + cols]
    return out


def initial_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device, dtype: torch.dtype, *,
                  seed: int, variation: SeedVariation | None = None, factor: int = 8) -> torch.Tensor:
    """The starting noise (B, C, H, W) of a batch: ``generator``'s draw without an active ``variation``, else
    the per-image noise the module doc describes (``factor``: pixels per latent, for ``resize_from``)."""
    if variation is None or not variation.active:
        return draw_noise(shape, generator, device, dtype)
    batch, channels, height, width = shape
    own = (channels, height, width)
    small = own if variation.resize_from is None else \
        (channels, variation.resize_from[1] // factor, variation.resize_from[0] // factor)
    images = []
    for i in range(batch):
        image_seed = seed + (0 if variation.strength > 0 else i)
        noise = draw_noise(small, make_generator(image_seed), torch.device("cpu"), torch.float32)
        if variation.strength > 0:
            other = draw_noise(small, make_generator(variation.subseed + i), torch.device("cpu"), torch.float32)
            noise = slerp(variation.strength, noise, other)
        if small != own:
            noise = _centred(noise, draw_noise(own, make_generator(image_seed), torch.device("cpu"), torch.float32))
        images.append(noise)
    return torch.stack(images).to(device, dtype)
