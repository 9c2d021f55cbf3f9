"""The autoencoder training loop (KL and VQ, LPIPS, PatchGAN with the adaptive weight) on tiny generated shapes."""
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from openldm.config import from_dict, load
from openldm.data import build_dataset
from openldm.io.native import load_model
from openldm.models.autoencoder import latent_mode
from openldm.models.discriminator import PatchGANDiscriminator, gan_losses
from openldm.models.lpips import LPIPS
from openldm.training.autoencoder import (
    AutoencoderTrainConfig,
    adaptive_weight,
    build_autoencoder,
    generator_terms,
    last_layer,
    train_autoencoder,
)
from openldm.training.checkpoint import load_state
from openldm.training.common import TrainingDiverged

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = {"name": "shapes", "options": {"size": 16, "num_samples": 128, "num_objects": 1, "backgrounds": ["black"]}}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(out_dir, preset: str = "tiny-vae", **over) -> AutoencoderTrainConfig:
    model = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
    if preset == "tiny-vq":
        model["num_embeddings"] = 64
    data = {
        "data": DATA, "autoencoder_preset": preset, "autoencoder": model,
        "discriminator": {"ndf": 8, "n_layers": 1, "norm": "group"}, "disc_start": 1000,
        "optim": {"lr": 2e-3, "betas": [0.9, 0.99]}, "disc_optim": {"lr": 1e-3},
        "batch_size": 8, "steps": 6, "log_every": 1, "save_every": 3, "sample_every": 0, "scale_samples": 32,
        "out_dir": str(out_dir),
    }
    data.update(over)
    return from_dict(AutoencoderTrainConfig, data)


def _images(cfg: AutoencoderTrainConfig, n: int = 32) -> torch.Tensor:
    dataset = build_dataset(cfg.data.name, cfg.data.options)
    return torch.stack([dataset[i]["image"] for i in range(n)])


@torch.no_grad()
def _recon_error(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    z = model.encode(x)
    return float((model.decode(latent_mode(z)) - x).abs().mean())


@pytest.mark.parametrize("preset", ["tiny-vae", "tiny-vq"])
def test_training_lowers_reconstruction_error(tmp_path, preset):
    cfg = tiny(tmp_path / "run", preset, steps=100, log_every=10, save_every=1000)
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    initial = build_autoencoder(cfg, 3)
    out = train_autoencoder(cfg, progress=False)
    x = _images(cfg)
    before, after = _recon_error(initial, x), _recon_error(load_model(out["autoencoder"]), x)
    print(f"{preset}: L1 {before:.4f} -> {after:.4f} ({before / after:.1f}x)")
    assert before / after >= 3.0
    keys = {"kl", "reg"} if preset == "tiny-vae" else {"codebook", "commitment", "perplexity", "reg"}
    assert keys | {"rec", "nll", "loss", "grad_norm", "lr"} <= set(out["history"][-1])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(10, 101, 10))


def test_discriminator_is_off_before_disc_start_and_on_after(tmp_path):
    cfg = tiny(tmp_path / "run", disc_start=2, steps=2, save_every=1000)
    before = train_autoencoder(cfg, progress=False)["history"]
    for rec in before:
        assert not {"g_loss", "d_loss", "gan_weight"} & set(rec)
    torch.manual_seed(cfg.seed)  # the loop's initialisation: autoencoder, then discriminator
    build_autoencoder(cfg, 3)
    initial = PatchGANDiscriminator(dataclasses.replace(cfg.discriminator, in_channels=3)).state_dict()
    saved = load_model(tmp_path / "run" / "discriminator.safetensors").state_dict()
    assert all(torch.equal(initial[k], saved[k]) for k in initial)

    after = train_autoencoder(dataclasses.replace(cfg, steps=4), resume=True, progress=False)["history"]
    assert [r["step"] for r in after] == [3, 4]
    for rec in after:
        assert rec["d_loss"] > 0 and rec["gan_weight"] > 0 and "g_loss" in rec and rec["d_grad_norm"] > 0
    trained = load_model(tmp_path / "run" / "discriminator.safetensors").state_dict()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)


def test_adaptive_weight_is_the_gradient_norm_ratio(tmp_path):
    cfg = tiny(tmp_path, disc_weight=0.5)
    torch.manual_seed(0)
    model = build_autoencoder(cfg, 3)
    disc = PatchGANDiscriminator(dataclasses.replace(cfg.discriminator, in_channels=3))
    x = _images(cfg, 4)
    recon, nll, _ = generator_terms(cfg, model, x, torch.Generator().manual_seed(0), None)
    g_loss = gan_losses("hinge")[1](disc(recon))
    weight = adaptive_weight(nll, g_loss, last_layer(model), cfg.disc_weight)

    w = model.decoder.conv_out.weight  # by hand: two backward passes, read the last layer's .grad
    nll.backward(retain_graph=True)
    nll_norm = w.grad.norm().item()
    w.grad = None
    g_loss.backward(retain_graph=True)
    g_norm = w.grad.norm().item()
    expected = 0.5 * min(max(nll_norm / (g_norm + 1e-4), 0.0), 1e4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad
    # Clamped at 1e4 (times disc_weight) when the GAN gradient vanishes.
    assert adaptive_weight(nll * 1e3, g_loss * 0.0, last_layer(model), 0.5).item() == pytest.approx(0.5e4)


@pytest.mark.parametrize("preset", ["tiny-vae", "tiny-vq"])
def test_resume_follows_the_uninterrupted_loss_curve(tmp_path, preset):
    over = {"disc_start": 2, "grad_accum": 2}  # both phases, both optimisers, accumulation
    if preset == "tiny-vq":
        over["autoencoder"] = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "num_embeddings": 64,
                               "ema": True, "dead_code_threshold": 1.0}  # EMA codebook + restarts from the generator
    full = train_autoencoder(tiny(tmp_path / "full", preset, **over), progress=False)["history"]
    part = train_autoencoder(tiny(tmp_path / "split", preset, steps=3, **over), progress=False)["history"]
    rest = train_autoencoder(tiny(tmp_path / "split", preset, **over), resume=True, progress=False)["history"]
    assert [r["step"] for r in part + rest] == list(range(1, 7))
    for key in ("loss", "rec", "reg", "d_loss", "gan_weight"):
        assert [r.get(key) for r in part + rest] == [r.get(key) for r in full], key  # bit-identical
    assert load_state(tmp_path / "split" / "training_state.safetensors")["step"] == 6


def test_saved_autoencoder_rebuilds_and_carries_the_measured_scale(tmp_path):
    cfg = tiny(tmp_path / "run", steps=4, sample_every=2, scale_samples=40)
    out = train_autoencoder(cfg, progress=False)
    model = load_model(tmp_path / "run" / "autoencoder.safetensors")
    assert type(model).__name__ == "AutoencoderKL" and model.config.channels == 8

    dataset = build_dataset(cfg.data.name, cfg.data.options)  # 1/std measured independently
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:40]
    with torch.no_grad():
        z = model.encode(torch.stack([dataset[int(i)]["image"] for i in rows])).mode().double()
    assert model.config.scaling_factor == pytest.approx(1.0 / z.std().item(), rel=1e-5)
    assert out["scaling_factor"] == model.config.scaling_factor
    assert model.config.scaling_factor != 1.0  # not the preset's

    assert load_model(tmp_path / "run" / "discriminator.safetensors").config.ndf == 8
    assert load(AutoencoderTrainConfig, tmp_path / "run" / "config.yaml") == cfg
    grids = sorted((tmp_path / "run" / "samples").iterdir())
    assert [p.name for p in grids] == ["step_000002.png", "step_000004.png"]
    assert Image.open(grids[0]).size == (8 * 18 + 2, 2 * 18 + 2)  # 8 images per row, originals over reconstructions


@pytest.mark.parametrize("preset", ["tiny-vae", "tiny-vq"])
def test_decoder_only_keeps_every_latent_and_trains_the_decoder(tmp_path, preset):
    first = train_autoencoder(tiny(tmp_path / "first", preset, steps=20, save_every=1000), progress=False)
    start = load_model(first["autoencoder"])
    cfg = tiny(tmp_path / "decoder", preset, steps=40, save_every=1000, disc_start=20, autoencoder={},
               init_from=first["autoencoder"], decoder_only=True)
    out = train_autoencoder(cfg, progress=False)
    tuned = load_model(out["autoencoder"])
    before, after = start.state_dict(), tuned.state_dict()
    side = ("encoder.", "quant_conv.", "quantizer.")
    frozen = [k for k in before if k.startswith(side)]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # codebook EMA buffers included
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith(".weight"))
    x = _images(cfg)
    with torch.no_grad():
        za, zb = start.encode(x), tuned.encode(x)
    za, zb = (za, zb) if preset == "tiny-vq" else (za.mode(), zb.mode())
    assert torch.equal(za, zb)
    assert out["scaling_factor"] == first["scaling_factor"]  # measured again on the same latents
    before_err, after_err = _recon_error(start, x), _recon_error(tuned, x)
    print(f"{preset}: decoder-only L1 {before_err:.4f} -> {after_err:.4f}")
    assert after_err < before_err
    assert "gan_weight" in out["history"][-1]


def test_init_from_and_decoder_only_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="decoder_only needs init_from"):
        AutoencoderTrainConfig(decoder_only=True)
    with pytest.raises(ValueError, match="architecture comes from that file"):
        AutoencoderTrainConfig(init_from="ae.safetensors", autoencoder={"channels": 8})
    with pytest.raises(FileNotFoundError, match="runs/NAME/autoencoder.safetensors"):
        train_autoencoder(tiny(tmp_path / "run", autoencoder={}, init_from=str(tmp_path / "missing.safetensors")),
                          progress=False)
    disc = train_autoencoder(tiny(tmp_path / "first", steps=1), progress=False)["autoencoder"].replace(
        "autoencoder.safetensors", "discriminator.safetensors")
    with pytest.raises(ValueError, match="not an autoencoder"):
        train_autoencoder(tiny(tmp_path / "run", autoencoder={}, init_from=disc), progress=False)


def test_lpips_term_with_weight_files(tmp_path):
    lpips = LPIPS.random(seed=0).state_dict()
    save_file({k: v.contiguous() for k, v in lpips.items() if k.startswith("features.")}, str(tmp_path / "vgg.safetensors"))
    save_file({k: v.contiguous() for k, v in lpips.items() if k.startswith("lin")}, str(tmp_path / "heads.safetensors"))
    cfg = tiny(tmp_path / "run", steps=2, save_every=1000, lpips_vgg=str(tmp_path / "vgg.safetensors"),
               lpips_heads=str(tmp_path / "heads.safetensors"), lpips_weight=0.5)
    hist = train_autoencoder(cfg, progress=False)["history"]
    for rec in hist:
        assert rec["lpips"] > 0
        assert rec["nll"] == pytest.approx(rec["rec"] + 0.5 * rec["lpips"], rel=1e-5)
    assert "lpips" not in train_autoencoder(tiny(tmp_path / "plain", steps=1), progress=False)["history"][0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 4"):
        train_autoencoder(tiny(tmp_path / "run", save_every=2), progress=False, fail_at_step=3)
    assert load_state(tmp_path / "run" / "training_state.safetensors")["step"] == 2
    assert load_model(tmp_path / "run" / "autoencoder.safetensors") is not None


def test_sigterm_saves_and_stops(tmp_path):
    def interrupt(rec):
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = train_autoencoder(tiny(tmp_path / "run", save_every=100), progress=False, on_log=interrupt)
    assert out["stopped"] and out["step"] == 2
    assert load_state(tmp_path / "run" / "training_state.safetensors")["step"] == 2


def test_recipes_load_and_bad_values_are_named():
    for name in ("fmnist_autoencoder_kl.yaml", "fmnist_autoencoder_kl_decoder.yaml", "fmnist_autoencoder_vq.yaml"):
        load(AutoencoderTrainConfig, CONFIGS / name)
    with pytest.raises(ValueError, match="'l3'"):
        AutoencoderTrainConfig(recon_loss="l3")
    with pytest.raises(ValueError, match="'wasserstein'"):
        AutoencoderTrainConfig(gan_loss="wasserstein")
    with pytest.raises(ValueError, match="lpips_heads"):
        AutoencoderTrainConfig(lpips_vgg="vgg.pth")
    with pytest.raises(ValueError, match="tiny-unet"):
        build_autoencoder(AutoencoderTrainConfig(autoencoder_preset="tiny-unet"), 3)
