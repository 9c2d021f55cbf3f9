"""Image grids for looking at samples and reconstructions: tensors in [-1, 1] -> one PIL image."""
from __future__ import annotations

import math

import torch
from PIL import Image

from openldm.data.image_io import tensor_to_pil


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> Image.Image:
    """Rows of images, each (N, C, H, W) in [-1, 1] with the same N, C, H, W -> one PIL image, rows stacked
    top to bottom with ``padding`` px of black between cells."""
    if not rows or any(r.dim() != 4 or r.shape != rows[0].shape for r in rows):
        raise ValueError(f"image_grid needs rows of equal shape (N, C, H, W); got {[tuple(r.shape) for r in rows]}")
    n, c, h, w = rows[0].shape
    grid = torch.full((c, len(rows) * (h + padding) + padding, n * (w + padding) + padding), -1.0)
    for r, images in enumerate(rows):
        for i, image in enumerate(images):
            top, left = padding + r * (h + padding), padding + i * (w + padding)
            grid[:, top:top + h, left:left + w] = image.detach().float().cpu()
    return tensor_to_pil(grid)


def tile(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """A batch (B, C, H, W) in [-1, 1] laid out row by row, ``columns`` per row (default: a near-square grid);
    empty cells of the last row are black."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"tile needs a non-empty batch (B, C, H, W); got {tuple(images.shape)}")
    B = images.shape[0]
    columns = columns or math.ceil(math.sqrt(B))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(B / columns)
    padded = torch.cat([images.detach().float().cpu(), images.new_full((rows * columns - B, *images.shape[1:]), -1.0).cpu()])
    return image_grid(list(padded.view(rows, columns, *images.shape[1:])), padding)
