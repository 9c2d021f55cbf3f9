"""Generated shapes: determinism, and captions / labels / masks that agree with the pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openldm.config import ConfigError
from openldm.data import build_dataset
from openldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    MASK_CLASSES,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    caption_matches,
    color_fractions,
    detect_objects,
    dominant_color,
)
from openldm.registry import DATASETS


def test_item_layout():
    ds = ShapesDataset(ShapesConfig(num_samples=10))
    item = ds[0]
    assert set(item) == {"image", "caption", "label", "color_label", "shape_label", "mask"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.long
    assert len(ds) == 10 and ds.class_names == list(COLORS)
    assert ShapesDataset(ShapesConfig(size=64))[0]["image"].shape == (3, 64, 64)


def test_deterministic_from_seed_and_index():
    a, b = ShapesDataset(ShapesConfig(num_samples=50)), ShapesDataset(ShapesConfig(num_samples=50))
    for i in (0, 7, 49):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    assert torch.equal(a[7]["image"], a[7]["image"])
    other = ShapesDataset(ShapesConfig(num_samples=50, seed=1))
    assert sum(a[i]["caption"] != other[i]["caption"] for i in range(20)) > 10
    assert len({a[i]["caption"] for i in range(50)}) > 40  # varied


@pytest.mark.parametrize("size", [32, 64])
def test_captions_labels_and_masks_match_the_pixels(size: int):
    """Deterministic pixel check: every palette-coloured pixel belongs to a captioned object, the relation holds
    between the colours' centroids, the mask marks exactly the object pixels with the right shape ids."""
    ds = ShapesDataset(ShapesConfig(num_samples=100, size=size))
    relations = set()
    for i in range(len(ds)):
        item, scene = ds[i], ds.scene(i)
        caption, image, mask = item["caption"], item["image"], item["mask"]
        assert caption_matches(image, caption), (i, caption)
        relations.add(scene.relation)
        first, second = scene.objects
        assert caption == f"a {first.color} {first.shape} {scene.relation} a {second.color} {second.shape}"
        assert item["label"] == item["color_label"] == list(COLORS).index(first.color)
        assert item["shape_label"] == list(SHAPES).index(first.shape)
        # background pixels have the background colour; object pixels the object's colour
        rgb = ((image + 1) * 127.5).round().long()  # (3, H, W)
        bg = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
        assert torch.all((rgb == bg).all(0) == (mask == 0))
        for obj in scene.objects:
            color = torch.tensor(COLORS[obj.color]).view(3, 1, 1)
            where = (rgb == color).all(0)
            assert torch.all(mask[where] == MASK_CLASSES.index(obj.shape))
            rows, cols = torch.nonzero(where, as_tuple=True)
            assert rows.min() >= obj.top and rows.max() < obj.top + obj.side
            assert cols.min() >= obj.left and cols.max() < obj.left + obj.side
        found = {o.color: o.shape for o in detect_objects(image)}
        assert found == {first.color: first.shape, second.color: second.shape}
    assert relations == {"above", "below", "to the left of", "to the right of"}


def test_detector_rejects_wrong_captions():
    ds = ShapesDataset(ShapesConfig(num_samples=20))
    item, scene = ds[0], ds.scene(0)
    a, b = scene.objects
    opposite = {"above": "below", "below": "above", "to the left of": "to the right of",
                "to the right of": "to the left of"}[scene.relation]
    assert not caption_matches(item["image"], f"a {a.color} {a.shape} {opposite} a {b.color} {b.shape}")
    absent = next(c for c in COLORS if c not in (a.color, b.color))
    assert not caption_matches(item["image"], f"a {absent} {a.shape}")
    other_shape = next(s for s in SHAPES if s != a.shape)
    assert not caption_matches(item["image"], f"a {a.color} {other_shape}")
    assert caption_matches(item["image"], f"a {a.color} {other_shape}", check_shapes=False)
    with pytest.raises(ValueError, match="not of the form"):
        caption_matches(item["image"], "two red circles")


def test_single_object_labels_and_dominant_colour():
    ds = ShapesDataset(ShapesConfig(num_samples=60, num_objects=1, label="shape", backgrounds=["gray"]))
    images = torch.stack([ds[i]["image"] for i in range(60)])
    assert torch.equal(dominant_color(images), torch.tensor([ds[i]["color_label"] for i in range(60)]))
    assert all(ds[i]["label"] == ds[i]["shape_label"] for i in range(60))
    assert all(caption_matches(ds[i]["image"], ds[i]["caption"]) for i in range(60))
    fractions = color_fractions(images[:1])
    assert fractions.shape == (1, len(COLORS)) and 0 < fractions.sum() < 1
    combined = ShapesDataset(ShapesConfig(num_samples=5, label="color_shape", colors=["red", "blue"]))
    assert combined.class_names == [f"{c} {s}" for c in ("red", "blue") for s in SHAPES]
    item = combined[3]
    assert item["label"] == item["color_label"] * 3 + item["shape_label"]


def test_registered_and_strict():
    assert DATASETS.get("shapes") is ShapesDataset
    ds = build_dataset("shapes", {"size": 48, "num_samples": 3, "colors": ["red", "green"]})
    assert len(ds) == 3 and ds[2]["image"].shape == (3, 48, 48)
    with pytest.raises(ConfigError, match="'purple'"):
        build_dataset("shapes", {"colors": ["red", "purple"]})
    with pytest.raises(ConfigError, match="label"):
        build_dataset("shapes", {"label": "size"})
    with pytest.raises(IndexError):
        ds[3]


def test_generated_pixels_are_pure_palette():
    ds = ShapesDataset(ShapesConfig(num_samples=10))
    palette = {tuple(c) for c in list(COLORS.values()) + list(BACKGROUNDS.values())}
    for i in range(10):
        rgb = ((ds[i]["image"] + 1) * 127.5).round().long().permute(1, 2, 0).reshape(-1, 3).numpy()
        assert {tuple(p) for p in np.unique(rgb, axis=0)} <= palette
