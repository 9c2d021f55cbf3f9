"""The README demo: grids from a trained model (a row per class, a row per prompt) and the retrain recipe chain
(autoencoder -> decoder fine-tune -> latent diffusion -> export) on a few steps."""
import pytest
import torch
from PIL import Image

from openldm.io.native import load_model
from openldm.pipelines.demo import demo_grids, retrain, run_demo
from openldm.pipelines.trained import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_AE = ["data.options={size: 32, limit: 64}", "steps=2", "batch_size=8", "sample_every=0", "scale_samples=16",
           "disc_start=1"]
TINY_LDM = ["data.options={size: 32, limit: 64, captions: true}", "steps=2", "batch_size=8", "sample_every=0",
            "unet.model_channels=16", "unet.head_dim=8", "unet.norm_groups=4"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = retrain(tmp_path_factory.mktemp("demo"), progress=False, overrides=TINY_LDM,
                  autoencoder_overrides=TINY_AE, log=lambda m: None)
    torch.set_num_threads(threads)
    return out


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


def test_demo_grids_have_a_row_per_class_and_per_prompt(retrained, tmp_path):
    grids = demo_grids(load_run(retrained), per_row=3, steps=2, zoom=2, prompts=["a bag", "a dress"])
    cell = 28 + 2  # tiles of 28 px with 2 px gaps
    assert grids["classes"].size == (2 * (2 + 3 * cell), 2 * (2 + 10 * cell))
    assert grids["prompts"].size == (2 * (2 + 3 * cell), 2 * (2 + 2 * cell))
    paths = run_demo(retrained, tmp_path / "demo.png", steps=2, per_row=2, log=lambda m: None)
    assert [p.name for p in paths] == ["demo-classes.png", "demo-prompts.png"]
    assert Image.open(paths[0]).mode == "L"


def test_retrain_names_a_missing_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="repository root"):
        retrain(tmp_path, autoencoder_recipe=str(tmp_path / "none.yaml"))
