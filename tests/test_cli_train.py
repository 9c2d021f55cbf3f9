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


def test_train_fine_tunes_a_stable_diffusion_checkpoint_then_samples_from_a_prompt(tmp_path, capsys):
    """configs/sd_finetune.yaml on a tiny random-weight SD v1 single file (written as the original layout) and a
    folder of four captioned images: `openldm train` fine-tunes its UNet for 2 steps, `openldm sample --prompt`
    draws from the run (VAE and CLIP reloaded from the checkpoint)."""
    pytest.importorskip("diffusers")
    from sd_testing import tiny_pipeline

    from openldm.io.sd import load_sd, save_sd

    folder, _ = tiny_pipeline(tmp_path)
    single = save_sd(load_sd(folder), tmp_path / "tiny_sd.safetensors", "original")
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (20, 16), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} picture")
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/sd_finetune.yaml", "--quiet", f"base_model={single}",
                 f"data.options.root={images}", "data.options.size=16", "batch_size=4", "grad_accum=1", "steps=2",
                 "precision=fp32", "device=cpu", "sample_every=0", "log_every=1", f"out_dir={run}"]) == 0
    assert "step 2" in capsys.readouterr().out
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(run), "--prompt", "a red picture", "--num-images", "2", "--steps", "2",
                 "--grid", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size[0] > 16
    assert main(["train", "--config", "configs/sd_finetune.yaml", "--quiet", f"base_model={single}",
                 "unet_preset=small-unet", f"out_dir={run}"]) == 2
    assert "unet_preset='small-unet'" in capsys.readouterr().err
