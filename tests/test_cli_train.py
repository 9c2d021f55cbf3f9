"""The training and sampling commands end to end on tiny models: train an autoencoder, train a class-conditional
latent diffusion model on its (cached) latents, and sample it from the run directory."""
import pytest
from PIL import Image

from openldm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_autoencoder_then_latent_diffusion_then_sample(tmp_path, capsys):
    ae_dir, run_dir = tmp_path / "ae", tmp_path / "ldm"
    assert main(["train-autoencoder", "--config", "configs/autoencoder_kl_fmnist.yaml", "--quiet",
                 "data.name=shapes", "data.options={size: 16, num_samples: 64}", "steps=3", "batch_size=8",
                 "lpips_weight=0", "log_every=1", "sample_every=0", "scale_samples=16", f"out_dir={ae_dir}"]) == 0
    assert "latent scale factor" in capsys.readouterr().out
    ae_file = ae_dir / "autoencoder.safetensors"
    assert ae_file.is_file()
    assert main(["train", "--config", "configs/shapes_class.yaml", "--quiet", f"autoencoder={ae_file}",
                 "data.options={size: 16, num_samples: 64}", "steps=3", "batch_size=8", "log_every=1",
                 "unet.model_channels=16", "unet.norm_groups=4", f"out_dir={run_dir}"]) == 0
    assert (run_dir / "latents").is_dir()  # the dataset was encoded once and cached
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(run_dir), "--class-label", "2", "--num-images", "3", "--steps", "4",
                 "--grid", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size[0] > 16  # three 16 px images tiled


def test_sample_rejects_a_missing_run(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "nothing" in capsys.readouterr().err
