import random

import numpy as np
import pytest
import torch
from torch import nn

from openldm.training.checkpoint import load_state, rng_state, save_state, set_rng_state
from openldm.training.ema import EMA


def _optimiser_state():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_training_state_round_trip_resumes_optimiser_exactly(tmp_path):
    torch.manual_seed(0)
    model, opt = _optimiser_state()
    state = {"step": 3, "optimizer": opt.state_dict(), "data": {"epoch": 1, "position": 17}, "pair": (1, "a")}
    save_state(state, tmp_path / "state.safetensors")
    back = load_state(tmp_path / "state.safetensors")
    assert back["step"] == 3 and back["data"] == {"epoch": 1, "position": 17} and back["pair"] == (1, "a")

    # a fresh optimiser loaded from the file takes exactly the same next step as the original
    model2 = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip(tmp_path):
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    save_state({"rng": rng_state()}, tmp_path / "s.safetensors")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_state(tmp_path / "s.safetensors")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state({"step": 1}, path)
    with pytest.raises(TypeError):
        save_state({"step": object()}, path)
    assert load_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_not_a_state_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not an openldm training-state"):
        load_state(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_state(tmp_path / "missing.safetensors")


def test_ema_matches_closed_form():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    for _ in range(5):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model)
    # shadow = 1 - 0.9^5 after five updates towards 1 from 0
    assert ema.shadow.weight.item() == pytest.approx(1 - 0.9**5, abs=1e-6)


def test_ema_warmup_and_state():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(2 / 11)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and other.decay == 0.9999
    for a, b in zip(other.shadow.parameters(), ema.shadow.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
