import json

import pytest
import torch

from openldm.io.native import load_model, read_metadata, save_model
from openldm.models.unet import UNet
from openldm.registry import PRESETS


def tiny_unet() -> UNet:
    kind, cfg = PRESETS.get("tiny-unet")()
    torch.manual_seed(0)
    return UNet(cfg)


def test_one_path_rebuilds_the_model(tmp_path):
    model = tiny_unet()
    path = save_model(model, tmp_path / "unet.safetensors", extra={"note": "x"})
    meta = read_metadata(path)
    assert meta["openldm.kind"] == "unet" and meta["note"] == "x"
    assert json.loads(meta["openldm.config"])["model_channels"] == model.config.model_channels
    back = load_model(path)
    assert back.config == model.config
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
    assert torch.equal(back(x, t), model.eval()(x, t))


def test_load_casts_dtype(tmp_path):
    path = save_model(tiny_unet(), tmp_path / "u.safetensors")
    back = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}


def test_not_an_openldm_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match="not an openldm model file"):
        load_model(tmp_path / "sd.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope.safetensors")
