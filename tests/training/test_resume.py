"""The one resume mechanism (training/checkpoint.py) on the tiny diffusion loop: checkpoints are whole, resume is
verified and honest, and the divergence guard saves nothing non-finite."""
import json

import pytest
import torch

from openldm.io.native import load_model
from openldm.training import checkpoint as ckpt
from openldm.training.checkpoint import load_state
from openldm.training.diffusion import TrainingDiverged, train_diffusion
from tests.training.test_diffusion_training import tiny


def test_a_write_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt.save_state

    def dies_at_step_6(state, path):
        if state["step"] == 6:
            raise KeyboardInterrupt("killed while writing")  # the weights of step 6 are already written
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_state", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(tiny(run), progress=False)
    monkeypatch.setattr(ckpt, "save_state", real)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert (run / "checkpoints" / ".step_000006.tmp").is_dir()  # what the kill left
    rest = train_diffusion(tiny(run), resume=True, progress=False)["history"]
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert not list((run / "checkpoints").glob(".*.tmp"))  # cleaned on the next start
    full = train_diffusion(tiny(tmp_path / "full"), progress=False)["history"]
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[3:]]  # bit-identical
    a, b = (load_model(p / "unet.safetensors").state_dict() for p in (run, tmp_path / "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_a_broken_latest_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train_diffusion(tiny(run, steps=6, save_every=2), progress=False)
    weights = run / "checkpoints" / "step_000006" / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rest = train_diffusion(tiny(run, steps=6, save_every=2), resume=True, progress=False)["history"]
    assert "step_000006 is not whole" in capsys.readouterr().err
    assert [r["step"] for r in rest] == [5, 6]
    assert load_state(run / "training_state.safetensors")["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000006"]


def test_resume_is_honest(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_diffusion(tiny(run, steps=3), resume=True, progress=False)
    train_diffusion(tiny(run, steps=3), progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_diffusion(tiny(run, steps=3), progress=False)
    with pytest.raises(ValueError, match="batch_size: 8 -> 16"):
        train_diffusion(tiny(run, batch_size=16), resume=True, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train_diffusion(tiny(run, seed=1), resume=True, progress=False)
    # a changed learning rate is applied from the resumed step on
    out = train_diffusion(tiny(run, steps=4, optim={"lr": 5e-4}), resume=True, progress=False)["history"]
    fresh = train_diffusion(tiny(tmp_path / "fresh", steps=4, optim={"lr": 5e-4}), progress=False)["history"]
    assert out[-1]["step"] == 4 and out[-1]["lr"] == fresh[-1]["lr"] != 0
    over = train_diffusion(tiny(run, steps=2), overwrite=True, progress=False)["history"]
    assert [r["step"] for r in over] == [1, 2]
    assert load_state(run / "training_state.safetensors")["step"] == 2


@pytest.mark.parametrize("optim", [{"lr": 1e10}, {"lr": 1e-3, "eps": 0.0}])
def test_divergence_saves_nothing_non_finite(tmp_path, optim):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step"):
        train_diffusion(tiny(run, steps=40, save_every=1, optim=optim), progress=False)
    for folder in (run / "checkpoints").glob("step_*"):
        for p in folder.glob("unet*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_model(p).state_dict().values()), p


def test_resume_with_dropout_follows_the_uninterrupted_run(tmp_path):
    """Dropout draws from the global torch RNG: restored on resume, and not disturbed by the rebuilt data loader
    (whose base seed once came from it, so a resumed run drew different dropout masks from then on)."""
    unet = {"model_channels": 16, "norm_groups": 4, "dropout": 0.1}
    full = train_diffusion(tiny(tmp_path / "full", unet=unet), progress=False)["history"]
    part = train_diffusion(tiny(tmp_path / "split", steps=4, unet=unet), progress=False)["history"]
    rest = train_diffusion(tiny(tmp_path / "split", unet=unet), resume=True, progress=False)["history"]
    assert [r["loss"] for r in part + rest] == [r["loss"] for r in full]
    a, b = (load_state(tmp_path / run / "training_state.safetensors")["rng"]["torch"] for run in ("full", "split"))
    assert torch.equal(a, b)
