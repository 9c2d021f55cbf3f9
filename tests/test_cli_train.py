"""The training and sampling commands end to end on tiny models: train an autoencoder, train a class-conditional
latent diffusion model on its (cached) latents, and sample it from the run directory."""
import pytest
from PIL import Image

from openldm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_autoencoder_then_latent_diffusion_then_sample(tmp_path, capsys):
    ae_dir, run_dir = tmp_path / "ae", tmp_path / "ldm"
    assert main(["train-autoencoder", "--config", "configs/fmnist_autoencoder_kl.yaml", "--quiet",
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


def test_train_clip_reports_retrieval_numbers(tmp_path, capsys):
    run = tmp_path / "clip"
    assert main(["train-clip", "--config", "configs/fmnist_clip.yaml", "--quiet", "steps=2", "batch_size=16",
                 "data.options.limit=64", "eval_data.limit=40", "eval_pairs=20", "model.channels=[8,16]",
                 "model.norm_groups=4", "model.text.hidden_size=32", "model.text.num_hidden_layers=1",
                 "model.text.intermediate_size=64", "model.text.max_position_embeddings=16", "log_every=1",
                 f"out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "step 2;" in out and "zero-shot acc" in out and "retrieval.json" in out
    assert (run / "clip.safetensors").is_file() and (run / "retrieval.json").is_file()
    assert main(["train-clip", "--config", "configs/fmnist_clip.yaml", "--quiet", "vocabulary=words"]) == 2
    assert "vocabulary" in capsys.readouterr().err
