"""A generated dataset for tests and demos: coloured shapes on plain backgrounds, with captions, class labels
and segmentation masks, drawn with Pillow and fully determined by (seed, index).

Two objects (by default) sit in opposite halves of the picture, so the caption's relation is true by construction:
"a red circle above a blue square". Colours are corners of the RGB cube and backgrounds are black, grey or white,
so a pixel's colour is unambiguous; :func:`detect_objects` reads colour, shape and position back from pixels
(also from generated samples), which is how tests check that a model obeys its condition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from openldm.data.image_io import pil_to_tensor
from openldm.data.transforms import Sample, item_generator, normalize
from openldm.registry import DATASETS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
MASK_CLASSES = ("background",) + SHAPES  # mask ids: 0 background, 1 circle, 2 square, 3 triangle
RELATIONS = ("above", "below", "to the left of", "to the right of")
LABELS = ("color", "shape", "color_shape")


@dataclass
class ShapesConfig:
    """``num_samples`` pictures of ``size`` x ``size`` px with ``num_objects`` (1 or 2) shapes drawn from ``shapes``
    in ``colors`` (distinct within a picture) on one of ``backgrounds``. ``label``: the class of the first
    (captioned-first) object: "color", "shape" or "color_shape" (color index * len(shapes) + shape index)."""

    size: int = 32
    num_samples: int = 10000
    num_objects: int = 2
    colors: list[str] = field(default_factory=lambda: list(COLORS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUNDS))
    label: str = "color"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, table in (("colors", COLORS), ("shapes", SHAPES), ("backgrounds", BACKGROUNDS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in table]
            if bad or not values or len(set(values)) != len(values):
                raise ValueError(f"ShapesConfig.{name}={values!r}; choose distinct names from: {', '.join(table)}")
        if self.label not in LABELS:
            raise ValueError(f"ShapesConfig.label={self.label!r}; choose one of: {', '.join(LABELS)}")
        if self.num_objects not in (1, 2):
            raise ValueError(f"ShapesConfig.num_objects={self.num_objects}; choose 1 or 2")
        if self.num_objects == 2 and len(self.colors) < 2:
            raise ValueError("ShapesConfig: two objects need at least two colors")
        if self.size < 16:
            raise ValueError(f"ShapesConfig.size={self.size}; must be >= 16")
        if self.num_samples < 1:
            raise ValueError(f"ShapesConfig.num_samples={self.num_samples}; must be >= 1")


class ShapeSpec(NamedTuple):
    """One drawn object: colour and shape names, and its box (top, left, side) in pixels."""

    color: str
    shape: str
    top: int
    left: int
    side: int


class Scene(NamedTuple):
    """Everything that determines one picture."""

    background: str
    objects: list[ShapeSpec]
    relation: str | None  # how objects[0] sits relative to objects[1]

    @property
    def caption(self) -> str:
        a = self.objects[0]
        if self.relation is None:
            return f"a {a.color} {a.shape}"
        b = self.objects[1]
        return f"a {a.color} {a.shape} {self.relation} a {b.color} {b.shape}"


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def make_scene(config: ShapesConfig, index: int) -> Scene:
    """The scene of item ``index``, drawn from a generator seeded by (config.seed, index)."""
    g = item_generator(config.seed, 0, index)
    S, n = config.size, config.num_objects
    margin = max(1, S // 16)
    half = S // 2
    pick = lambda options: options[_randint(0, len(options) - 1, g)]  # noqa: E731
    background = pick(config.backgrounds)
    colors = [pick(config.colors)]
    if n == 2:
        colors.append(pick([c for c in config.colors if c != colors[0]]))
    relation = pick(RELATIONS) if n == 2 else None
    # each object gets a region (rows0, rows1, cols0, cols1): the whole picture, or its half for the relation
    full = (0, S, 0, S)
    regions = {None: [full], "above": [(0, half, 0, S), (half, S, 0, S)], "below": [(half, S, 0, S), (0, half, 0, S)],
               "to the left of": [(0, S, 0, half), (0, S, half, S)],
               "to the right of": [(0, S, half, S), (0, S, 0, half)]}[relation]
    objects = []
    for color, (r0, r1, c0, c1) in zip(colors, regions):
        limit = min(r1 - r0, c1 - c0) - 2 * margin
        smallest = max(6, S // 4)  # below 6 px a circle and a triangle fill their boxes alike
        side = _randint(smallest, max(smallest, min(limit, S // 2)), g)
        top = _randint(r0 + margin, r1 - margin - side, g)
        left = _randint(c0 + margin, c1 - margin - side, g)
        objects.append(ShapeSpec(color, pick(config.shapes), top, left, side))
    return Scene(background, objects, relation)


def _draw(draw: ImageDraw.ImageDraw, spec: ShapeSpec, fill) -> None:
    x0, y0, x1, y1 = spec.left, spec.top, spec.left + spec.side - 1, spec.top + spec.side - 1
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render_scene(scene: Scene, size: int) -> tuple[Image.Image, Image.Image]:
    """(RGB picture, "L" mask of ids in MASK_CLASSES). Drawing is not antialiased, so every object pixel has its
    exact palette colour and the mask covers exactly the same pixels."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    mask = Image.new("L", (size, size), 0)
    for spec in scene.objects:
        _draw(ImageDraw.Draw(image), spec, COLORS[spec.color])
        _draw(ImageDraw.Draw(mask), spec, MASK_CLASSES.index(spec.shape))
    return image, mask


@DATASETS.register("shapes")
class ShapesDataset(Dataset):
    """Item: {"image": float (3, size, size) in [-1, 1], "caption": str, "label": int (per config.label),
    "color_label": int, "shape_label": int (indices into config.colors / config.shapes, of the first object),
    "mask": long (size, size) with ids of MASK_CLASSES}. ``class_names`` names the "label" values."""

    config_class = ShapesConfig

    def __init__(self, config: ShapesConfig | None = None):
        self.config = c = config or ShapesConfig()
        self.class_names = {"color": list(c.colors), "shape": list(c.shapes),
                            "color_shape": [f"{col} {shp}" for col in c.colors for shp in c.shapes]}[c.label]
        self.mask_classes = list(MASK_CLASSES)

    def __len__(self) -> int:
        return self.config.num_samples

    def scene(self, index: int) -> Scene:
        """The scene behind item ``index`` (objects with their boxes, background, relation)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} shapes")
        return make_scene(self.config, index)

    def __getitem__(self, index: int) -> Sample:
        c = self.config
        scene = self.scene(index)
        image, mask = render_scene(scene, c.size)
        color, shape = c.colors.index(scene.objects[0].color), c.shapes.index(scene.objects[0].shape)
        label = {"color": color, "shape": shape, "color_shape": color * len(c.shapes) + shape}[c.label]
        return {"image": normalize(pil_to_tensor(image)), "caption": scene.caption, "label": label,
                "color_label": color, "shape_label": shape,
                "mask": torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())}

    def fingerprint(self) -> str:
        """Changes when the config changes (the pictures are a function of it)."""
        return hashlib.sha256(json.dumps([type(self).__name__, dataclasses.asdict(self.config)]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ pixel detector
class DetectedObject(NamedTuple):
    """An object found by colour: name, guessed shape, centroid (row, col) in pixels and pixel count."""

    color: str
    shape: str
    row: float
    col: float
    pixels: int


def color_map(image: torch.Tensor, max_distance: float = 0.5) -> torch.Tensor:
    """(3, H, W) image in [-1, 1] -> (H, W) long: index into COLORS of each pixel's nearest palette colour when
    nearer than ``max_distance`` (RGB in [0, 1]; palette colours are >= 1 apart, backgrounds >= 0.86 away), else -1."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got {tuple(image.shape)}")
    # NumPy: single-threaded, so per-image calls stay fast on a busy machine
    rgb = (np.clip(image.detach().float().cpu().numpy(), -1, 1) + 1) / 2  # (3, H, W)
    palette = np.asarray(list(COLORS.values()), dtype=np.float32) / 255  # (K, 3)
    dist2 = np.square(rgb[None] - palette[:, :, None, None]).sum(1)  # (K, H, W)
    index = dist2.argmin(0)
    best = np.take_along_axis(dist2, index[None], 0)[0]
    return torch.from_numpy(np.where(best < max_distance**2, index, -1).astype(np.int64))


def color_fractions(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, len(COLORS)): the fraction of each image's pixels in each palette colour."""
    maps = torch.stack([color_map(im) for im in images])  # (B, H, W)
    counts = torch.stack([(maps == k).flatten(1).sum(1) for k in range(len(COLORS))], dim=1)  # (B, K)
    return counts.float() / maps[0].numel()


def dominant_color(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B,) index into COLORS of the colour covering most pixels."""
    return color_fractions(images).argmax(dim=1)


def _guess_shape(rows: np.ndarray, cols: np.ndarray) -> str:
    """By how much of its bounding box a blob fills: square 1, circle ~pi/4 (>= 0.67 drawn at >= 6 px), triangle
    ~1/2 (<= 0.625)."""
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = len(rows) / float(box)
    return "square" if fill > 0.92 else "circle" if fill > 0.645 else "triangle"


def detect_objects(image: torch.Tensor, min_pixels: int = 6) -> list[DetectedObject]:
    """Objects in a (3, H, W) image in [-1, 1], one per palette colour covering >= ``min_pixels`` pixels, largest
    first. Works on the dataset's pictures exactly and on generated ones approximately."""
    cmap = color_map(image).numpy()
    found = []
    for k, name in enumerate(COLORS):
        rows, cols = np.nonzero(cmap == k)
        if len(rows) >= min_pixels:
            found.append(DetectedObject(name, _guess_shape(rows, cols), float(rows.mean()), float(cols.mean()), len(rows)))
    return sorted(found, key=lambda o: -o.pixels)


_CAPTION = re.compile(r"^a (\w+) (\w+)(?: (above|below|to the left of|to the right of) a (\w+) (\w+))?$")


def caption_matches(image: torch.Tensor, caption: str, check_shapes: bool = True) -> bool:
    """Whether a (3, H, W) image in [-1, 1] shows what a shapes caption says: the colours, the relation between the
    two objects' centroids, and (``check_shapes``) their shapes by fill ratio."""
    m = _CAPTION.match(caption)
    if m is None:
        raise ValueError(f"caption {caption!r} is not of the form 'a COLOR SHAPE [RELATION a COLOR SHAPE]'")
    color_a, shape_a, relation, color_b, shape_b = m.groups()
    objects = {o.color: o for o in detect_objects(image)}
    wanted = [(color_a, shape_a)] + ([(color_b, shape_b)] if relation else [])
    for color, shape in wanted:
        if color not in objects or (check_shapes and objects[color].shape != shape):
            return False
    if relation:
        a, b = objects[color_a], objects[color_b]
        return {"above": a.row < b.row, "below": a.row > b.row,
                "to the left of": a.col < b.col, "to the right of": a.col > b.col}[relation]
    return True
