"""The diffusion loop's training data: the source dataset, its latents (cached once, or encoded batch by batch),
how a batch becomes x0, and the inputs conditions derive from the images. ``openldm.training.diffusion`` runs the
loop over it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from openldm.conditioning.compose import ComposedConditioner
from openldm.config import ConditionConfig
from openldm.data import build_dataset
from openldm.io.run_dir import DATA_FILE, DiffusionTrainConfig, data_facts, write_json
from openldm.models.autoencoder import LatentCodec
from openldm.registry import CONDITIONERS


def reads_pixels(conditions: list[ConditionConfig]) -> bool:
    """Whether a condition needs the training images beside cached latents (its class declares ``reads_pixels``)."""
    return any(CONDITIONERS.get(c.kind).reads_pixels for c in conditions)


class WithPixels(torch.utils.data.Dataset):
    """A dataset's items plus a copy of "image" as "pixels": a latent cache built from it keeps the pixels."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["pixels"] = item["image"]
        return item

    def fingerprint(self) -> str:
        from openldm.data.latent_cache import fingerprint_dataset

        return fingerprint_dataset(self.dataset) + ":pixels"


def describe_data(dataset, data_shape: Sequence[int]) -> dict[str, Any]:
    """The facts about a source dataset that sampling needs (the run's ``data.json``)."""
    C, H, W = dataset[0]["image"].shape
    return data_facts(data_shape, (H, W), C, getattr(dataset, "class_names", None),
                      getattr(dataset, "crop_size", None))


@dataclass
class TrainingData:
    """What the loop draws batches from, and how a batch becomes x0 (what is denoised): ``batch[x0_key]`` times
    ``scale`` (pixels with scale 1, or cached latents), or, with ``encode`` (on-the-fly latents), ``encode`` of
    the batch's images (it applies the scale)."""

    dataset: Any
    x0_key: str
    scale: float
    encode: LatentCodec | None = None

    def x0(self, batch: dict, device: torch.device) -> torch.Tensor:
        if self.encode is not None:
            return self.encode(batch["image"]).to(device)  # (B, C, h, w)
        return batch[self.x0_key].to(device).float() * self.scale


def prepare_data(cfg: DiffusionTrainConfig, out_dir: Path, autoencoder: nn.Module | None = None,
                 scale: float | None = None) -> TrainingData:
    """The training data: pixels (no ``autoencoder``), latents cached once with the autoencoder (the pixels kept
    too when a condition reads them), or with ``cache_latents: false`` the images, encoded batch by batch. The scale
    factor is ``scale`` when given (a base run's), else the autoencoder's ``scaling_factor``, else measured
    (1 / std). Rank 0 writes ``data.json`` (:func:`describe_data`)."""
    dataset = build_dataset(cfg.data.name, cfg.data.options)
    main = not dist.is_initialized() or dist.get_rank() == 0
    if autoencoder is None:
        data, shape = TrainingData(dataset, "image", 1.0), dataset[0]["image"].shape
    elif cfg.cache_latents:
        from openldm.data.latent_cache import autoencoder_encoder, build_latent_cache

        source = WithPixels(dataset) if reads_pixels(cfg.conditions) else dataset
        cache = build_latent_cache(source, autoencoder_encoder(autoencoder), out_dir / "latents", progress=False,
                                   device=next(autoencoder.parameters()).device)
        scale = float(scale or getattr(autoencoder.config, "scaling_factor", None) or cache.meta["scaling_factor"])
        data, shape = TrainingData(cache, "latent", scale), cache[0]["latent"].shape
    else:
        scale = scale or getattr(autoencoder.config, "scaling_factor", None)
        if not scale:
            from openldm.data.latent_cache import measure_scaling_factor

            probe = torch.stack([dataset[i]["image"] for i in range(min(64, len(dataset)))])
            scale = measure_scaling_factor(LatentCodec(autoencoder, 1.0)(probe))
        encode = LatentCodec(autoencoder, float(scale))
        data = TrainingData(dataset, "image", float(scale), encode)
        shape = encode(dataset[0]["image"][None]).shape[1:]
    if main:
        write_json(out_dir / DATA_FILE, describe_data(dataset, shape))
    return data


def condition_inputs(batch: dict, conditioner: ComposedConditioner) -> dict:
    """The batch with the inputs conditions derive from the images: "image" from a latent cache's "pixels", then
    each conditioner's own derived input (``Conditioner.derive_input``: a low-res image shrunk from the image, a
    brightness measured on it, ...)."""
    batch = dict(batch)
    if "pixels" in batch and "image" not in batch:
        batch["image"] = batch.pop("pixels").float()
    for name, c in conditioner.conditioners.items():
        needs = c.derive_input(batch)
        if needs is not None and needs not in batch:
            raise ValueError(
                f"condition {name!r} ({type(c).__name__}) reads batch[{needs!r}], but the data has neither it nor "
                f"pixel images (keys: {sorted(batch)}); cached latents carry no pixels: set `autoencoder:` and train "
                f"from the image dataset, so the cache built here keeps them, or give the data a {needs!r} column")
    return batch
