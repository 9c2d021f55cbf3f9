"""DeepCache (Ma et al. 2023): interval 1 is the plain UNet exactly; a cheap call equals the plain UNet's own forward
with the output of the block before the shallow up branch replaced (by a forward hook) by the feature kept at the last
full pass; ceil(steps / N) full passes over a sampler run; a change of batch refreshes the cache; the option reaches
the bundled model through requests, PNG parameters and the CLI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_testing import randomize

from openldm.cli import main
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod
from openldm.diffusion.spacing import make_plan
from openldm.models.deepcache import DeepCacheUNet
from openldm.models.unet import UNet, UNetConfig
from openldm.nn.slots import Slots
from openldm.pipelines import read_png_params
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator
from openldm.samplers import sample_euler

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_levels=(0, 1), num_heads=2, context_dim=12, norm_groups=8)


@pytest.fixture(scope="module")
def unet():
    return randomize(UNet(CONFIG)).eval()


def inputs(seed: int, B: int = 2, H: int = 12, W: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, H, W, generator=g), torch.randn(B, 5, 12, generator=g)


@torch.no_grad()
def test_interval_one_is_the_plain_unet_exactly(unet):
    cached = DeepCacheUNet(unet, 1)
    context = inputs(0)[1]
    for i, t in enumerate([900.0, 500.0, 20.0]):
        x = inputs(i + 1)[0]
        assert torch.equal(cached(x, t, context=context), unet(x, t, context=context))
    assert cached.full_passes == cached.calls == 3


def _block_before_the_branch(unet: UNet, branch: int) -> torch.nn.Module:
    """The module whose output enters the shallow up branch: up[-(branch + 2)], or the middle block."""
    cut = len(unet.up) - branch - 1
    return unet.up[cut - 1] if cut > 0 else unet.mid


@torch.no_grad()
@pytest.mark.parametrize("branch", [1, 3, len(UNet(CONFIG).down)])
def test_a_cheap_call_is_the_plain_forward_with_the_kept_deep_feature_substituted(unet, branch):
    x1, context = inputs(1)
    x2, _ = inputs(2)
    block = _block_before_the_branch(unet, branch)
    kept = []
    handle = block.register_forward_hook(lambda module, args, out: kept.append(out))
    unet(x1, 800.0, context=context)  # the plain UNet at the full pass
    handle.remove()
    handle = block.register_forward_hook(lambda module, args, out: kept[0])  # ... and at the cheap one, substituted
    expected = unet(x2, 700.0, context=context)
    handle.remove()

    cached = DeepCacheUNet(unet, 3, branch=branch)
    assert torch.equal(cached(x1, 800.0, context=context), unet(x1, 800.0, context=context)), "a full pass"
    out = cached(x2, 700.0, context=context)
    assert cached.full_passes == 1 and cached.calls == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - unet(x2, 700.0, context=context)).abs().max() > 1e-3, "the cheap call differs from a full pass"


class Counted(torch.nn.Module):
    """``net`` counting the calls of its middle block (one per full pass)."""

    def __init__(self, net, unet):
        super().__init__()
        self.net, self.mids = net, 0
        unet.mid.register_forward_hook(self._count)

    def _count(self, *_):
        self.mids += 1

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("steps, interval", [(5, 2), (6, 3), (7, 3), (7, 4), (4, 9)])
def test_a_sampler_run_makes_ceil_steps_over_n_full_passes(steps, interval):
    unet = randomize(UNet(CONFIG)).eval()
    cached = DeepCacheUNet(unet, interval)
    counted = Counted(cached, unet)
    denoiser = DiscreteDenoiser(counted, make_alphas_cumprod(ScheduleConfig()), "eps")
    plan = make_plan("euler", ScheduleConfig(), steps)
    x, context = inputs(3)
    sample_euler(denoiser, plan.sigmas[0] * x, plan.sigmas, cond=Slots(context=context), progress=False)
    assert cached.calls == steps
    assert cached.full_passes == counted.mids == math.ceil(steps / interval)


@torch.no_grad()
def test_a_new_batch_shape_runs_the_whole_network(unet):
    x, context = inputs(4, B=2)
    cached = DeepCacheUNet(unet, 5)
    cached(x, 500.0, context=context)
    out = cached(x[:1], 400.0, context=context[:1])  # guidance switched off: batch B instead of 2B
    assert cached.full_passes == 2
    assert torch.equal(out, unet(x[:1], 400.0, context=context[:1]))


@pytest.mark.parametrize("interval, branch", [(0, 1), (2.5, 1), (True, 1), (2, 0), (2, 99)])
def test_bad_settings_are_value_errors(unet, interval, branch):
    with pytest.raises(ValueError, match="deepcache"):
        DeepCacheUNet(unet, interval, branch)


def test_a_network_other_than_the_unet_is_refused():
    with pytest.raises(ValueError, match="UNet"):
        DeepCacheUNet(torch.nn.Conv2d(4, 4, 1), 3)


@pytest.fixture(scope="module")
def bundled():
    return load_generator()


def test_on_the_bundled_model_through_the_request(bundled):
    calls = []
    handle = bundled.model.unet.mid.register_forward_hook(lambda *_: calls.append(1))
    try:
        base = {"class_label": 4, "steps": 20, "seed": 1, "num_images": 2}
        plain = bundled.generate(GenerationRequest(**base))
        full = len(calls)
        cached = bundled.generate(GenerationRequest(**base, deepcache_interval=3))
    finally:
        handle.remove()
    assert full == 20 and len(calls) - full == 7, "ceil(20 / 3) full passes"
    other = bundled.generate(GenerationRequest(**{**base, "seed": 2}))
    a, b, c = (np.stack([np.asarray(im, dtype=np.float64) for im in r.images]) for r in (plain, cached, other))
    # measured: mean |difference| 8 grey levels with the cache, 38 between two seeds
    assert 0 < np.abs(a - b).mean() < 0.4 * np.abs(a - c).mean(), "cheaper, different, and still the same picture"
    assert cached.params[0].deepcache_interval == 3
    assert "DeepCache interval: 3" in cached.params[0].to_text()
    assert GenerationParams.from_text(cached.params[0].to_text()).deepcache_interval == 3
    with pytest.raises(RequestError) as e:
        bundled.generate(GenerationRequest(**base, deepcache_interval=0))
    assert e.value.field == "deepcache_interval"


def test_cli_flag(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--class-label", "2", "--steps", "4", "--deepcache", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert read_png_params(out).deepcache_interval == 2
    assert main(["generate", "--class-label", "2", "--deepcache", "0", "--out", str(out), "--quiet"]) == 2
    assert "deepcache interval 0" in capsys.readouterr().err
    assert main(["evaluate", "--deepcache", "0", "--quiet"]) == 2, "evaluate takes the step cutters too"
    assert "deepcache interval 0" in capsys.readouterr().err
