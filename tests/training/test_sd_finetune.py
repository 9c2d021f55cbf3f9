"""Fine-tuning a Stable Diffusion v1 checkpoint with the diffusion training loop (``base_model``), on a tiny
random-weight SD written in the diffusers layout by tests/sd_testing.py and a captioned image folder; and latents
encoded on the fly (``cache_latents: false``) against the cached ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_testing import tiny_pipeline

from openldm.conditioning.compose import build_conditioning
from openldm.conditioning.text import base_resources
from openldm.config import ConfigError, from_dict
from openldm.io.native import load_model
from openldm.io.sd import load_sd
from openldm.pipelines.common import encode_text
from openldm.pipelines.trained import load_run, sample_trained
from openldm.training import diffusion
from openldm.training.diffusion import (
    DiffusionTrainConfig,
    build_unet,
    train_diffusion,
    upgrade_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(diffusers folder of a tiny random-weight SD v1, captioned image folder of 8 16 px squares)."""
    root = tmp_path_factory.mktemp("sd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder, _ = tiny_pipeline(root)
    torch.set_num_threads(threads)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        pixels = np.full((16, 16, 3), 245, np.uint8)
        top, left = rng.integers(0, 8, 2)
        pixels[top: top + 8, left: left + 8] = rgb
        Image.fromarray(pixels).save(images / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a {name} square"}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder, images


def config(tiny_sd, out_dir, **over) -> DiffusionTrainConfig:
    folder, images = tiny_sd
    data = {
        "base_model": str(folder),
        "data": {"name": "image_folder", "options": {"root": str(images), "size": 16}},
        "conditions": [{"kind": "text", "options": {"backend": "external"}, "drop_prob": 0.1}],
        "batch_size": 4, "steps": 3, "log_every": 1, "save_every": 1000, "ema_decay": 0.9,
        "optim": {"lr": 1e-3}, "out_dir": str(out_dir),
    }
    data.update(over)
    return from_dict(DiffusionTrainConfig, data)


@torch.no_grad()
def test_the_fine_tuned_unet_starts_as_the_checkpoint_with_the_pipeline_prompt_encoding(tiny_sd, tmp_path):
    """Step 0: the UNet training builds equals the checkpoint's (bit for bit), and with the text condition's
    context (the checkpoint's CLIP, backend "external") it predicts what our SD pipeline's UNet predicts with
    ``encode_text``'s context, for prompts and for the null (empty prompt) condition. Measured: max abs diff 0."""
    cfg = config(tiny_sd, tmp_path / "run")
    sd = load_sd(cfg.base_model)
    conditioner = build_conditioning(cfg.conditions, base_resources(sd, None)).eval()
    unet = build_unet(cfg, 4, conditioner, sd.unet).eval()
    ours, theirs = unet.state_dict(), sd.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours[next(iter(ours))].data_ptr() != theirs[next(iter(ours))].data_ptr()  # a copy: trained apart

    prompts = ["a red square", "a blue square on grass"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    cond, uncond = encode_text(sd, prompts)
    for slots, ref in ((conditioner({"caption": prompts}, latent_size=(8, 8)), cond),
                       (conditioner.null(2, latent_size=(8, 8)), uncond)):
        torch.testing.assert_close(slots.context, ref.context, rtol=0, atol=0)
        torch.testing.assert_close(unet(x, t, **slots.as_kwargs()), sd.unet(x, t, context=ref.context),
                                   rtol=0, atol=1e-6)


def test_fine_tuning_trains_the_unet_only_and_the_run_samples(tiny_sd, tmp_path, monkeypatch):
    """A few steps change the UNet; the checkpoint's VAE and CLIP (loaded by training) stay bit-identical; the
    loss falls on the 8 captioned squares (measured: mean of the first 5 steps 0.997, of the last 5 0.286); load_run rebuilds the run (UNet from the run, VAE + CLIP from the base
    checkpoint, the checkpoint's scale factor and spacing) and samples from a prompt."""
    loaded = []
    real = diffusion.load_base_model
    monkeypatch.setattr(diffusion, "load_base_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    cfg = config(tiny_sd, tmp_path / "run", steps=30, log_every=1, batch_size=8)
    history = train_diffusion(cfg, progress=False)["history"]
    losses = [h["loss"] for h in history]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first

    fresh = load_sd(cfg.base_model)
    (sd,) = loaded
    for name in ("vae", "text_encoder"):
        a, b = getattr(sd, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(p.requires_grad for p in getattr(sd, name).parameters())
    trained = load_model(tmp_path / "run" / "unet.safetensors").state_dict()
    changed = [k for k, v in fresh.unet.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(changed) == len(trained)  # every UNet tensor moved

    model = load_run(tmp_path / "run")
    assert model.scaling_factor == pytest.approx(0.18215) and model.spacing == fresh.spacing
    assert model.data_shape == (4, 8, 8) and model.image_size == (16, 16)
    assert all(torch.equal(a, b) for a, b in zip(model.autoencoder.state_dict().values(),
                                                   fresh.vae.state_dict().values()))
    images = sample_trained(model, prompt="a green square", num_images=2, steps=3, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    again = sample_trained(model, prompt="a green square", num_images=2, steps=3, seed=0)
    assert torch.equal(images, again)


def test_on_the_fly_latents_give_the_cached_first_step_loss(tiny_sd, tmp_path):
    """The same data, seed and first batch: the loss of step 1 with latents encoded per batch equals the loss
    with the latent cache (posterior mode times the checkpoint's 0.18215 both ways). Measured: bit-identical on CPU."""
    cached = train_diffusion(config(tiny_sd, tmp_path / "cached", steps=1), progress=False)["history"]
    live = train_diffusion(config(tiny_sd, tmp_path / "live", steps=1, cache_latents=False), progress=False)["history"]
    assert (tmp_path / "cached" / "latents").is_dir() and not (tmp_path / "live" / "latents").exists()
    assert live[0]["loss"] == pytest.approx(cached[0]["loss"], rel=1e-5)
    assert json.loads((tmp_path / "live" / "data.json").read_text())["data_shape"] == [4, 8, 8]


def test_base_model_refuses_what_it_cannot_honour(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="unet_preset='small-unet'"):
        config(tiny_sd, tmp_path / "a", unet_preset="small-unet")
    with pytest.raises(ConfigError, match="unet=.*model_channels"):
        config(tiny_sd, tmp_path / "b", unet={"model_channels": 16})
    with pytest.raises(ConfigError, match="remove autoencoder="):
        config(tiny_sd, tmp_path / "c", autoencoder="ae.safetensors")
    with pytest.raises(ValueError, match="schedule .*'linear'.*set schedule and prediction to the checkpoint's"):
        train_diffusion(config(tiny_sd, tmp_path / "d", schedule={"kind": "linear"}), progress=False)
    with pytest.raises(ValueError, match="prediction 'v'"):
        train_diffusion(config(tiny_sd, tmp_path / "e", prediction="v"), progress=False)
    with pytest.raises(ValueError, match="context_dim.*backend 'external'"):
        train_diffusion(config(tiny_sd, tmp_path / "f", conditions=[
            {"kind": "text", "options": {"backend": "external", "context_dim": 64}}]), progress=False)


def test_low_res_factor_moved_into_the_condition(tmp_path):
    with pytest.raises(ConfigError, match=r"low_res_factor=2 .*conditions: \[\{kind: low_res, options: \{factor: 2\}\}\]"):
        from_dict(DiffusionTrainConfig, {"low_res_factor": 2})
    old = {"low_res_factor": 2, "conditions": [{"kind": "low_res", "options": {"channels": 1}},
                                               {"kind": "class_label"}]}
    cfg = from_dict(DiffusionTrainConfig, upgrade_config(old))  # a run written before the move still loads
    assert cfg.conditions[0].options == {"factor": 2, "channels": 1} and cfg.conditions[1].options == {}
