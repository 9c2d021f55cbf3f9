"""Every recipe in configs/ loads strictly into the config class of the command that runs it."""
from pathlib import Path

import pytest
import yaml

from openldm.config import load

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _config_class(data: dict):
    from openldm.training.autoencoder import AutoencoderTrainConfig
    from openldm.training.clip import CLIPTrainConfig
    from openldm.training.diffusion import DiffusionTrainConfig

    if "autoencoder_preset" in data or "init_from" in data:
        return AutoencoderTrainConfig
    if "unet_preset" in data or "conditions" in data or "base_model" in data:
        return DiffusionTrainConfig
    return CLIPTrainConfig


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    assert {"fmnist_autoencoder_kl.yaml", "fmnist_class_text.yaml", "fmnist_clip.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_loads(path):
    cls = _config_class(yaml.safe_load(path.read_text()))
    cfg = load(cls, path)
    assert isinstance(cfg, cls)
