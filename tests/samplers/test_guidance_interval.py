"""Guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024): inside it the wrapper is plain CFG,
outside it the conditional denoiser from one network call of batch B; over a sampler run the network sees 2B only
at the plan's sigmas inside the interval; requests, PNG parameters and the CLI flag carry it; on the bundled model an
interval covering every sigma gives plain CFG's pixels and one covering none gives the unguided pixels."""
import math

import numpy as np
import pytest
import torch
from sampler_oracles import SD

from openldm.cli import main
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import make_alphas_cumprod
from openldm.diffusion.spacing import make_plan
from openldm.nn.slots import Slots
from openldm.pipelines import read_png_params
from openldm.pipelines.common import GenerationParams, StepCutters
from openldm.pipelines.generate import GenerationRequest, RequestError, request_from_params
from openldm.pipelines.sources import load_generator
from openldm.samplers import CFGDenoiser, sample_euler
from openldm.samplers.guidance import with_guidance


class CountingNet(torch.nn.Module):
    """A nonlinear stand-in network ``eps = tanh(x_t * (1 + c) + t / 1000)``, c the vector slot broadcast over the
    channels; records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x_t, t, vector):
        self.batches.append(x_t.shape[0])
        return torch.tanh(x_t * (1 + vector.view(-1, x_t.shape[1], 1, 1)) + t.view(-1, 1, 1, 1) / 1000)


@pytest.fixture
def setup():
    ab = make_alphas_cumprod(SD)
    net = CountingNet()
    den = DiscreteDenoiser(net, ab, "eps")
    cond = Slots(vector=torch.tensor([[1.0, -1.0], [0.5, 0.0], [2.0, 1.0]]))
    uncond = Slots(vector=torch.zeros(1, 2))
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    return net, den, cond, uncond, x


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_inside_the_interval_it_is_plain_cfg_exactly(setup, rescale):
    net, den, cond, uncond, x = setup
    sigma = torch.full((3,), 2.5)
    plain = CFGDenoiser(den, uncond, 5.0, rescale)(x, sigma, cond)
    for interval in [(2.5, 2.5), (0.5, 10.0), (0.0, math.inf)]:
        net.batches.clear()
        out = CFGDenoiser(den, uncond, 5.0, rescale, interval=interval)(x, sigma, cond)
        assert net.batches == [6], "one batched call of conditional and unconditional"
        assert torch.equal(out, plain)


def test_outside_the_interval_it_is_the_conditional_denoiser_from_one_call_of_batch_b(setup):
    net, den, cond, uncond, x = setup
    for sigma_value, interval in [(0.3, (0.5, 10.0)), (12.0, (0.5, 10.0)), (2.5, (0.0, 0.0))]:
        sigma = torch.full((3,), sigma_value)
        expected = den(x, sigma, cond)
        net.batches.clear()
        out = CFGDenoiser(den, uncond, 5.0, 0.7, interval=interval)(x, sigma, cond)
        assert net.batches == [3], "the conditional pass only"
        assert torch.equal(out, expected)
        assert not torch.allclose(out, CFGDenoiser(den, uncond, 5.0)(x, sigma, cond)), "guidance changes it"


def test_a_batch_at_mixed_noise_levels_is_guided_only_where_inside(setup):
    _, den, cond, uncond, x = setup
    sigma = torch.tensor([0.3, 2.5, 12.0])
    out = CFGDenoiser(den, uncond, 5.0, interval=(0.5, 10.0))(x, sigma, cond)
    plain = CFGDenoiser(den, uncond, 5.0)(x, sigma, cond)
    conditional = den(x, sigma, cond)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2]], conditional[[0, 2]], rtol=1e-6, atol=1e-6)


def test_over_an_euler_run_the_network_sees_the_doubled_batch_only_inside_the_interval(setup):
    net, den, cond, uncond, x = setup
    plan = make_plan("euler", SD, 12)
    lo, hi = float(plan.sigmas[8]), float(plan.sigmas[2])  # steps 2..8 guided
    guided = with_guidance(den, uncond, 5.0, interval=(lo, hi))
    net.batches.clear()
    out = sample_euler(guided, plan.sigmas[0] * x, plan.sigmas, cond=cond, progress=False)
    inside = [(lo <= float(s) <= hi) for s in plan.sigmas[:-1]]
    assert sum(inside) == 7
    assert net.batches == [6 if i else 3 for i in inside]
    assert sum(net.batches) / 3 == 12 + 7, "network evaluations per image: one per step plus one per guided step"
    # the interval's steps really are guided: the run differs from both the unguided and the fully guided run
    unguided = sample_euler(den, plan.sigmas[0] * x, plan.sigmas, cond=cond, progress=False)
    full = sample_euler(with_guidance(den, uncond, 5.0), plan.sigmas[0] * x, plan.sigmas, cond=cond, progress=False)
    assert not torch.allclose(out, unguided) and not torch.allclose(out, full)


@pytest.mark.parametrize("bad", [(1.0, 0.5), (-0.1, 1.0), (math.nan, 1.0), (1.0,), "ab"])
def test_a_bad_interval_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="guidance interval"):
        StepCutters(guidance_interval=bad)
    with pytest.raises(ValueError, match="guidance interval"):
        with_guidance(torch.nn.Identity(), Slots(), 3.0, interval=bad)


def test_the_interval_round_trips_through_png_parameters():
    params = GenerationParams(prompt="a cat", guidance_interval=(0.28, 5.42))
    text = params.to_text()
    assert "Guidance interval: \"0.28, 5.42\"" in text
    back = GenerationParams.from_text(text)
    assert back.guidance_interval == (0.28, 5.42) and back.cutters() == StepCutters((0.28, 5.42))
    assert request_from_params(back).guidance_interval == (0.28, 5.42)
    assert "Guidance interval" not in GenerationParams(prompt="a cat").to_text()


@pytest.fixture(scope="module")
def bundled():
    return load_generator()


def _pixels(result):
    return np.stack([np.asarray(im) for im in result.images])


def test_on_the_bundled_model_the_interval_spans_plain_cfg_and_no_guidance(bundled):
    base = {"class_label": 3, "steps": 6, "seed": 2, "guidance_scale": 3.0}
    plain = _pixels(bundled.generate(GenerationRequest(**base)))
    unguided = _pixels(bundled.generate(GenerationRequest(**{**base, "guidance_scale": 1.0})))
    everywhere = bundled.generate(GenerationRequest(**base, guidance_interval=(0.0, math.inf)))
    nowhere = _pixels(bundled.generate(GenerationRequest(**base, guidance_interval=(0.0, 0.0))))
    assert np.array_equal(_pixels(everywhere), plain) and np.array_equal(nowhere, unguided)
    assert not np.array_equal(plain, unguided)
    assert everywhere.params[0].guidance_interval == (0.0, math.inf)
    with pytest.raises(RequestError) as e:
        bundled.generate(GenerationRequest(**base, guidance_interval=(2.0, 1.0)))
    assert e.value.field == "guidance_interval"


def test_cli_flag_reaches_the_request_and_the_png(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--class-label", "1", "--steps", "3", "--guidance-interval", "0.5", "20",
                 "--out", str(out), "--quiet"]) == 0
    assert read_png_params(out).guidance_interval == (0.5, 20.0)
    assert main(["generate", "--class-label", "1", "--steps", "3", "--guidance-interval", "3", "1",
                 "--out", str(out), "--quiet"]) == 2
    assert "guidance interval (3, 1)" in capsys.readouterr().err
