"""Turning a generation request's values (paths, PIL images, tensors, labels) into the batch entries a
conditioner reads: the shared conversions behind ``Conditioner.request_batch``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from openldm.data.image_io import load_image, load_label_map, pil_to_tensor, to_channels

ImageInput = Image.Image | str | Path | torch.Tensor


def batched(x: torch.Tensor, B: int, what: str) -> torch.Tensor:
    if x.shape[0] == B:
        return x
    if x.shape[0] == 1:
        return x.expand(B, *x.shape[1:])
    raise ValueError(f"{what} has batch {x.shape[0]}; give 1 (shared) or one per image ({B})")


def as_images(image: ImageInput, channels: int, size: tuple[int, int] | None, what: str) -> torch.Tensor:
    """A path, PIL image or tensor ((C, H, W) / (N, C, H, W) in [-1, 1]) -> (N, C, H, W) float in [-1, 1], resized
    to ``size`` (H, W) when given and different (Lanczos for PIL images, antialiased bicubic for tensors)."""
    if isinstance(image, torch.Tensor):
        x = image.float()[None] if image.dim() == 3 else image.float()
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} tensor must be (C, H, W) or (N, C, H, W) with C = {channels}; got {tuple(image.shape)}")
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        return x
    img = load_image(image, channels) if isinstance(image, (str, Path)) else to_channels(image, channels)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return pil_to_tensor(img)[None] * 2 - 1


def fill_mask(mask: ImageInput, size: tuple[int, int]) -> torch.Tensor:
    """An inpainting mask (white / > 0.5 = fill) -> (N, 1, H, W) float in {0, 1} at the image size."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m[None, None] if m.dim() == 2 else m[:, None] if m.dim() == 3 else m
        return (F.interpolate(m, size=size, mode="nearest") > 0.5).float()
    return (as_images(mask, 1, size, "mask") > 0).float()  # [-1, 1]: > 0 is >= half grey


def label_map(mask: ImageInput) -> torch.Tensor:
    """A segmentation label map (path to an L/P/I PNG of ids, PIL image, or (H, W) / (N, H, W) integer tensor) ->
    (N, H, W) long."""
    if isinstance(mask, torch.Tensor):
        m = mask if mask.is_floating_point() else mask.long()
    elif isinstance(mask, (str, Path)):
        m = load_label_map(mask)
    else:
        m = torch.from_numpy(np.asarray(mask).astype(np.int64))
    return m[None] if m.dim() == 2 else m


def repeat(values: Sequence[Any], n: int) -> list[Any]:
    return [v for v in values for _ in range(n)]  # value-major, as num_images per prompt


def class_indices(class_label: int | str | Sequence[int | str], class_names: Sequence[str] | None) -> list[int]:
    """Class labels (indices or names) as indices."""
    labels = [class_label] if isinstance(class_label, (int, str)) else list(class_label)
    out = []
    for v in labels:
        if isinstance(v, str):
            if not class_names or v not in class_names:
                raise ValueError(f"class {v!r} is not a class name of this model; names: {class_names}")
            v = list(class_names).index(v)
        out.append(int(v))
    return out
