"""Datasets, transforms and the latent cache. Importing this package registers every dataset in
``openldm.registry.DATASETS``: "idx" / "fashion_mnist", "image_folder", "shapes", "emoji", "latent_cache".

Every dataset item is a dict: "image" float (C, H, W) in [-1, 1] (or "latent" for the latent cache) and, where the
dataset has them, "label" int, "caption" str, "mask" (H, W) long label ids or float silhouette.
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from openldm.config import from_dict
from openldm.data.emoji import EmojiConfig, EmojiDataset, build_emoji
from openldm.data.folder import ImageFolderConfig, ImageFolderDataset, UnreadableImageWarning
from openldm.data.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, IDXConfig, IDXDataset, read_idx, write_idx
from openldm.data.latent_cache import (
    LatentCacheConfig,
    LatentCacheDataset,
    autoencoder_encoder,
    build_latent_cache,
    measure_scaling_factor,
)
from openldm.data.shapes import ShapesConfig, ShapesDataset, caption_matches, detect_objects, dominant_color
from openldm.registry import DATASETS


def build_dataset(name: str, options: dict[str, Any] | None = None) -> Dataset:
    """The registered dataset ``name`` built from a plain dict of its config's fields, checked strictly
    (unknown keys and wrong types raise ConfigError naming them)."""
    cls = DATASETS.get(name)
    return cls(from_dict(cls.config_class, options or {}, where=f"dataset {name}"))


__all__ = [
    "build_dataset", "IDXConfig", "IDXDataset", "read_idx", "write_idx", "FASHION_MNIST_CLASSES", "MNIST_CLASSES",
    "ImageFolderConfig", "ImageFolderDataset", "UnreadableImageWarning", "ShapesConfig", "ShapesDataset",
    "detect_objects", "dominant_color", "caption_matches", "LatentCacheConfig", "LatentCacheDataset",
    "build_latent_cache", "autoencoder_encoder", "measure_scaling_factor", "EmojiConfig", "EmojiDataset", "build_emoji",
]
