"""The recipe chain that retrains the bundled model (autoencoder -> decoder fine-tune -> latent diffusion), on a few
steps and exported (the ``retrained`` fixture in conftest.py)."""
import pytest
import torch

from openldm.io.native import load_model
from openldm.pipelines.trained import load_run
from openldm.training.recipes import retrain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_retrain_chains_the_recipes_and_exports_a_class_and_text_model(retrained):
    assert (retrained / "autoencoder.safetensors").is_file() and (retrained / "data.json").is_file()
    work = retrained.parent
    first = load_model(work / "autoencoder" / "autoencoder.safetensors").state_dict()
    shipped = load_model(retrained / "autoencoder.safetensors").state_dict()
    encoder_side = [k for k in first if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(first[k].half(), shipped[k]) for k in encoder_side)
    assert not torch.equal(first["decoder.conv_out.weight"].half(), shipped["decoder.conv_out.weight"])
    model = load_run(retrained)
    kinds = sorted(type(c).__name__ for c in model.conditioner.conditioners.values())
    assert kinds == ["ClassLabelConditioner", "TextConditioner"]
    assert model.crop_size == (28, 28) and model.image_size == (32, 32)


def test_retrain_names_a_missing_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="repository root"):
        retrain(tmp_path, autoencoder_recipe=str(tmp_path / "none.yaml"))
