"""Reading and writing images with Pillow: files -> float tensors, label maps -> integer tensors, tensors -> PIL.

Decoding lives here and nowhere else; resizing lives in :mod:`openldm.data.transforms`. Every mode Pillow opens
is brought to 8-bit "RGB" or "L" on its full range: 16-bit ("I;16", "I;16B", ...) and 32-bit integer ("I") images
are scaled from their sample range (0..65535, or 0..2^31-1 for 32-bit TIFFs), floats ("F") are taken as 0..1, "1"
as 0/255, "CMYK" converted, transparency composited over white. ``max_pixels`` bounds what is decoded: a JPEG above
it is decoded at a reduced scale (PIL's draft mode, 1/2 to 1/8) when that fits, any other image above it is refused
from its header, before a pixel is decoded; PIL's own decompression-bomb guard then never fires first.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MODES = {1: "L", 3: "RGB"}
DRAFT_SCALES = (1, 2, 4, 8)  # the reductions libjpeg decodes at


def is_image_file(path: str | Path) -> bool:
    """True when the name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` with PIL's decompression-bomb guard turned into this module's terms: its warning (above
    ``Image.MAX_IMAGE_PIXELS``) is silenced, as the callers' own ``max_pixels`` check follows, and its refusal
    (above twice that) is a ValueError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {str(path)!r} is too large to decode ({e})") from None
        with img:
            yield img


def _fit(img: Image.Image, path: str | Path, max_pixels: int | None, min_size: int | None = None) -> None:
    """Set JPEG draft decoding to the largest reduction that keeps both sides >= ``min_size`` and, at least, the
    one that brings the image within ``max_pixels``; refuse (ValueError) an image still above ``max_pixels``."""
    w, h = img.size
    scale = 1
    if img.format == "JPEG":
        if min_size is not None:
            scale = max(s for s in DRAFT_SCALES if s == 1 or min(w // min_size, h // min_size) >= s)
        while (max_pixels is not None and scale < DRAFT_SCALES[-1]
               and math.ceil(w / scale) * math.ceil(h / scale) > max_pixels):
            scale *= 2
        if scale > 1:
            img.draft(img.mode, (w // scale, h // scale))
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
        reduced = " even at 1/8 scale" if img.format == "JPEG" else ""
        raise ValueError(f"image {str(path)!r} is {w}x{h} ({w * h} pixels), above max_image_pixels={max_pixels}"
                         f"{reduced}; downscale the file or raise max_image_pixels")


def verify_image(path: str | Path, full: bool = False, max_pixels: int | None = None) -> str | None:
    """None when ``path`` looks like a readable image, else the reason. The quick check (``full=False``) reads the
    header and runs PIL's ``verify()`` (checksums for PNG; JPEG data is not decoded, so a truncated JPEG passes);
    ``full=True`` decodes every pixel. An image that cannot be brought within ``max_pixels`` is refused."""
    try:
        with open_image(path) as img:
            _fit(img, path, max_pixels)
            if full:
                img.load()
            else:
                img.verify()
        return None
    except Exception as e:  # PIL raises many kinds: OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(e).__name__}: {e}"


def _sample_scale(img: Image.Image) -> float:
    """Full scale of a high-bit-depth single-channel image's samples: 16-bit data (I;16*, and "I" from 16-bit
    PNG/PGM files) 65535, 32-bit integer TIFFs 2^31 - 1 (PIL's "I" is signed), floats 1."""
    if img.mode == "F":
        return 1.0
    if img.mode == "I" and 32 in tuple(getattr(img, "tag_v2", {}).get(258, ())):
        return float(2**31 - 1)
    return 65535.0


def to_8bit(img: Image.Image, full_scale: float | None = None) -> Image.Image:
    """An image of any Pillow mode with more than 8 bits a sample ("I;16", "I;16B", "I;16L", "I", "F") -> "L" on the
    same relative scale, ``full_scale`` (default: from the mode and the file's tags) -> 255, values outside
    clipped; other modes unchanged."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    scale = _sample_scale(img) if full_scale is None else full_scale
    array = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array * (255.0 / scale)), 0, 255).astype(np.uint8))


def load_image(path: str | Path, channels: int = 3, min_size: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Decode the first frame of an image file as "RGB" (``channels=3``) or "L" (``channels=1``), turned upright by
    its EXIF orientation, any mode on its full range (see the module doc); transparency is composited over white.
    ``min_size`` lets JPEG decoding shrink by a power of two (PIL's draft mode) while both sides stay >=
    ``min_size``: much faster for large photos. ``max_pixels``: see the module doc (None: no limit)."""
    if channels not in MODES:
        raise ValueError(f"channels={channels}; choose 1 (grey) or 3 (RGB)")
    with open_image(path) as img:
        img.seek(0)  # first frame of an animation
        _fit(img, path, max_pixels, min_size)
        img.load()
        full_scale = _sample_scale(img)  # from the file's tags, which a transposed copy lacks
        return to_channels(ImageOps.exif_transpose(img), channels, full_scale)


def to_channels(img: Image.Image, channels: int = 3, full_scale: float | None = None) -> Image.Image:
    """An image of any mode -> "RGB" (``channels=3``) or "L" (``channels=1``) on its full range (:func:`to_8bit`),
    transparency composited over white: what :func:`load_image` makes of a file, for images already in memory."""
    if channels not in MODES:
        raise ValueError(f"channels={channels}; choose 1 (grey) or 3 (RGB)")
    img = to_8bit(img, full_scale)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
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


def load_image_tensor(path: str | Path, channels: int = 3, min_size: int | None = None,
                      max_pixels: int | None = None) -> torch.Tensor:
    """:func:`load_image` then :func:`pil_to_tensor`: float (C, H, W) in [0, 1]."""
    return pil_to_tensor(load_image(path, channels, min_size, max_pixels))


def load_label_map(path: str | Path) -> torch.Tensor:
    """A label map image -> long tensor (H, W) of the stored ids. Single-channel files ("L", "P" palette indices,
    "I", "I;16", "1") give their values directly; an RGB(A) file is accepted only when it is grey (R = G = B)."""
    with open_image(path) as img:
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
