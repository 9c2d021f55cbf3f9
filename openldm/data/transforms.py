"""Image and mask transforms without torchvision: plain tensor functions, and small transform objects over a
sample dict that keep the image and its mask aligned.

Conventions:
- an image is a float tensor (C, H, W) in [0, 1] until ``Normalize`` maps it to [-1, 1];
- a mask is a tensor (H, W): long label ids, or a float silhouette in [0, 1];
- a sample is a dict; the transforms touch only its ``"image"`` and ``"mask"`` entries and return a new dict.

Every transform is called as ``t(sample, generator)``. Random ones draw only from that ``torch.Generator`` (and
refuse to run without one); datasets make it with :func:`item_generator` from (seed, epoch, index), so an item's
augmentation is the same in every run, with any number of DataLoader workers, before and after a resume.
Datasets with random augmentation have ``set_epoch(epoch)``: call it before iterating an epoch's DataLoader
(workers copy the dataset when an iterator starts, so ``persistent_workers=True`` would keep the old epoch).
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F

Sample = dict[str, Any]
Transform = Callable[..., Sample]  # (sample, generator=None) -> sample

CROPS = ("center", "random")
PAD_MODES = ("zeros", "reflect")


# ------------------------------------------------------------------------------------------------ randomness
def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index) through a hash, so nearby items get unrelated streams."""
    digest = hashlib.blake2b(struct.pack("<3q", seed, epoch, index), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _require(generator: torch.Generator | None, who: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{who} is random and needs an explicit torch.Generator: call it as t(sample, generator)")
    return generator


# ------------------------------------------------------------------------------------------------ functions
def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"expected a float image of shape (C, H, W), got {image.dtype} {tuple(image.shape)}")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"expected a mask of shape (H, W), got {tuple(mask.shape)}")


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side equal to ``size`` and the aspect ratio kept (rounded)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if height <= width:
        return size, max(size, int(round(width * size / height)))
    return max(size, int(round(height * size / width))), size


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing (a low-pass filter when shrinking, like PIL), clamped to [0, 1]."""
    _check_image(image)
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp_(0.0, 1.0)  # bicubic overshoots at edges


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) mask; label ids stay ids, dtype is kept. "nearest-exact" samples
    pixel centres (as PIL's NEAREST does), so a mask and its image stay aligned under resizing."""
    _check_mask(mask)
    if tuple(mask.shape) == (height, width):
        return mask
    out = F.interpolate(mask[None, None].double(), size=(height, width), mode="nearest-exact")[0, 0]
    return out.to(mask.dtype)


def crop(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """The window [top, top + height) x [left, left + width) of the last two dims; it must lie inside."""
    H, W = x.shape[-2:]
    if top < 0 or left < 0 or top + height > H or left + width > W:
        raise ValueError(f"crop window top={top}, left={left}, {height}x{width} does not fit in {H}x{W}")
    return x[..., top:top + height, left:left + width]


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size`` x ``size`` window (odd margins: one more pixel at bottom/right)."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the image {height}x{width}; resize first")
    return (height - size) // 2, (width - size) // 2


def crop_center(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centred (h, w) window of (..., H, W) images (:func:`center_crop_box` placement)."""
    H, W = images.shape[-2:]
    h, w = size
    if h > H or w > W:
        raise ValueError(f"crop size {h}x{w} is larger than the images {H}x{W}")
    top, left = (H - h) // 2, (W - w) // 2
    return images[..., top:top + h, left:left + w]


def random_crop_box(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly placed ``size`` x ``size`` window, drawn from ``generator``."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the image {height}x{width}; resize first")
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror the last dim (width) of an image (C, H, W), a mask (H, W) or a batch."""
    return x.flip(-1)


def pad_to(x: torch.Tensor, size: int, mode: str = "zeros") -> torch.Tensor:
    """Pad the last two dims to at least ``size`` x ``size``, centred (odd margins: one more at bottom/right).
    ``mode``: "zeros" (0 = black for images, background for masks) or "reflect" (mirror without the edge)."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode {mode!r}; choose one of: {', '.join(PAD_MODES)}")
    H, W = x.shape[-2:]
    dh, dw = max(0, size - H), max(0, size - W)
    if dh == dw == 0:
        return x
    pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)  # left, right, top, bottom
    if mode == "zeros":
        return F.pad(x, pad)
    if max(pad[0], pad[1]) >= W or max(pad[2], pad[3]) >= H:
        raise ValueError(f"reflect padding {H}x{W} to {size}x{size} needs margins smaller than the image; use 'zeros'")
    lead = x.shape[:-2]
    y = x.reshape(1, -1, H, W)
    y = F.pad(y.double() if not y.is_floating_point() else y, pad, mode="reflect").to(x.dtype)
    return y.reshape(*lead, H + dh, W + dw)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return image * 2.0 - 1.0


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((image + 1.0) * 0.5).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ sample transforms
def _apply(sample: Sample, image_fn: Callable[[torch.Tensor], torch.Tensor],
           mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sample:
    out = dict(sample)
    out["image"] = image_fn(sample["image"])
    if sample.get("mask") is not None:
        out["mask"] = (mask_fn or image_fn)(sample["mask"])
    return out


class ResizeShorter:
    """Resize so the image's shorter side is ``size`` (bicubic, antialiased); the mask is resized to exactly the
    image's new size (nearest), so a mask that starts at a different resolution still ends aligned."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"ResizeShorter size must be >= 1, got {size}")
        self.size = size

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        h, w = shorter_side_size(*sample["image"].shape[-2:], self.size)
        return _apply(sample, lambda x: resize_image(x, h, w), lambda m: resize_mask(m, h, w))


class Resize:
    """Resize to exactly ``height`` x ``width`` (bicubic for the image, nearest for the mask)."""

    def __init__(self, height: int, width: int | None = None):
        self.height, self.width = height, width if width is not None else height
        if self.height < 1 or self.width < 1:
            raise ValueError(f"Resize size must be >= 1, got {self.height}x{self.width}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        h, w = self.height, self.width
        return _apply(sample, lambda x: resize_image(x, h, w), lambda m: resize_mask(m, h, w))


class CenterCrop:
    """Centred ``size`` x ``size`` crop of image and mask."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        top, left = center_crop_box(*sample["image"].shape[-2:], self.size)
        return _apply(sample, lambda x: crop(x, top, left, self.size, self.size))


class RandomCrop:
    """``size`` x ``size`` crop at a position drawn from the generator; the same window for image and mask."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        top, left = random_crop_box(*sample["image"].shape[-2:], self.size, _require(generator, "RandomCrop"))
        return _apply(sample, lambda x: crop(x, top, left, self.size, self.size))


class RandomHorizontalFlip:
    """Mirror image and mask together with probability ``p`` (one draw from the generator per call). Captions
    are left as they are: do not flip data whose captions say "left" or "right"."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        draw = float(torch.rand((), generator=_require(generator, "RandomHorizontalFlip")))
        return _apply(sample, hflip) if draw < self.p else sample


class Pad:
    """Centre-pad image and mask to ``size`` x ``size``; see :func:`pad_to` for the modes."""

    def __init__(self, size: int, mode: str = "zeros"):
        if mode not in PAD_MODES:
            raise ValueError(f"Pad mode {mode!r}; choose one of: {', '.join(PAD_MODES)}")
        self.size, self.mode = size, mode

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return _apply(sample, lambda x: pad_to(x, self.size, self.mode))


class Normalize:
    """Image [0, 1] -> [-1, 1]; the mask is left alone."""

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        out = dict(sample)
        out["image"] = normalize(sample["image"])
        return out


class Compose:
    """Apply transforms in order, passing each the same generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, generator)
        return sample

    def __repr__(self) -> str:
        return f"Compose([{', '.join(type(t).__name__ for t in self.transforms)}])"


def image_transform(size: int, crop: str = "center", flip: bool = False) -> Compose:
    """The usual training pipeline: shorter side to ``size``, ``crop`` ("center" or "random") to a square,
    optional random horizontal flip, then [-1, 1]."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r}; choose one of: {', '.join(CROPS)}")
    steps: list[Transform] = [ResizeShorter(size), CenterCrop(size) if crop == "center" else RandomCrop(size)]
    if flip:
        steps.append(RandomHorizontalFlip())
    steps.append(Normalize())
    return Compose(steps)
