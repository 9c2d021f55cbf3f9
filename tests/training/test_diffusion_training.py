"""The diffusion training loop on a tiny class-conditional pixel-space model over generated shapes."""
import os
import signal

import pytest

from openldm.config import from_dict
from openldm.training.checkpoint import load_state
from openldm.training.diffusion import (
    DiffusionTrainConfig,
    TrainingDiverged,
    train_diffusion,
)


def tiny(out_dir, **over) -> DiffusionTrainConfig:
    data = {
        "data": {"name": "shapes", "options": {"size": 16, "num_samples": 64}},
        "unet_preset": "tiny-unet",
        "unet": {"model_channels": 16, "norm_groups": 4},
        "conditions": [{"kind": "class_label", "options": {"num_classes": 8, "dim": 16}, "drop_prob": 0.2}],
        "schedule": {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "batch_size": 8, "steps": 6, "log_every": 1, "save_every": 3, "out_dir": str(out_dir),
        "optim": {"lr": 1e-3},
    }
    data.update(over)
    return from_dict(DiffusionTrainConfig, data)


def test_resume_follows_the_uninterrupted_loss_curve(tmp_path):
    full = train_diffusion(tiny(tmp_path / "full"), progress=False)["history"]
    part = train_diffusion(tiny(tmp_path / "split", steps=3), progress=False)["history"]
    rest = train_diffusion(tiny(tmp_path / "split"), resume=True, progress=False)["history"]
    losses = [h["loss"] for h in full]
    assert [h["loss"] for h in part + rest] == losses  # bit-identical, step for step
    assert load_state(tmp_path / "split" / "training_state.safetensors")["step"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path / "run", steps=10, save_every=2)
    with pytest.raises(TrainingDiverged, match="step 6"):
        train_diffusion(cfg, progress=False, fail_at_step=5)
    state = load_state(tmp_path / "run" / "training_state.safetensors")
    assert state["step"] == 4
    from openldm.io.native import load_model

    assert load_model(tmp_path / "run" / "unet.safetensors") is not None


def test_sigterm_saves_and_stops(tmp_path):
    def interrupt(rec):
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = train_diffusion(tiny(tmp_path / "run", save_every=100), progress=False, on_log=interrupt)
    assert out["stopped"] and out["step"] == 2
    assert load_state(tmp_path / "run" / "training_state.safetensors")["step"] == 2


def test_loss_falls(tmp_path):
    hist = train_diffusion(tiny(tmp_path / "run", steps=40, log_every=10, save_every=1000,
                                optim={"lr": 2e-3}), progress=False)["history"]
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="grad_accum"):
        DiffusionTrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="'bf17'"):
        DiffusionTrainConfig(precision="bf17")
