"""Reading and writing images with Pillow: files -> float tensors, label maps -> integer tensors, tensors -> PIL.

Decoding lives here and nowhere else; resizing lives in :mod:`openldm.data.transforms`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MODES = {1: "L", 3: "RGB"}


def is_image_file(path: str | Path) -> bool:
    """True when the name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def verify_image(path: str | Path, full: bool = False) -> str | None:
    """None when ``path`` looks like a readable image, else the reason. The quick check (``full=False``) reads the
    header and runs PIL's ``verify()`` (checksums for PNG; JPEG data is not decoded, so a truncated JPEG passes);
    ``full=True`` decodes every pixel."""
    try:
        with Image.open(path) as img:
            if full:
                img.load()
            else:
                img.verify()
        return None
    except Exception as e:  # PIL raises many kinds: OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(e).__name__}: {e}"


def load_image(path: str | Path, channels: int = 3, min_size: int | None = None) -> Image.Image:
    """Decode the first frame of an image file as "RGB" (``channels=3``) or "L" (``channels=1``), turned upright by
    its EXIF orientation; transparency is composited over white. ``min_size`` lets JPEG decoding shrink by a power
    of two (PIL's draft mode) while both sides stay >= ``min_size``: much faster for large photos."""
    if channels not in MODES:
        raise ValueError(f"channels={channels}; choose 1 (grey) or 3 (RGB)")
    with Image.open(path) as img:
        img.seek(0)  # first frame of an animation
        if min_size is not None and img.format == "JPEG":
            img.draft(img.mode, (min_size, min_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        return img.convert(MODES[channels])


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image ("L" or "RGB") -> float tensor (C, H, W) in [0, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image_tensor(path: str | Path, channels: int = 3, min_size: int | None = None) -> torch.Tensor:
    """:func:`load_image` then :func:`pil_to_tensor`: float (C, H, W) in [0, 1]."""
    return pil_to_tensor(load_image(path, channels, min_size))


def load_label_map(path: str | Path) -> torch.Tensor:
    """A label map image -> long tensor (H, W) of the stored ids. Single-channel files ("L", "P" palette indices,
    "I", "I;16", "1") give their values directly; an RGB(A) file is accepted only when it is grey (R = G = B)."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img)[..., :3]
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ValueError(f"mask {str(path)!r} is a colour image; save label maps as single-channel "
                                 f"(L, P or I mode) PNGs whose pixel values are the label ids")
            array = rgb[..., 0]
        elif img.mode in ("L", "P", "I", "I;16", "1"):
            array = np.asarray(img)
        else:
            raise ValueError(f"mask {str(path)!r} has mode {img.mode!r}; accepted: L, P, I, I;16, 1, or grey RGB")
    return torch.from_numpy(array.astype(np.int64))


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float image (C, H, W) in [-1, 1] with C = 1 or 3 -> PIL image (values outside are clamped)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (1 or 3, H, W), got {tuple(image.shape)}")
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))
