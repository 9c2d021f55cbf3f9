"""The shared test base: every registered sampler is checked the same way — its signature and registry entry,
seeded determinism, the on_step hook (observing and replacing x), the condition passing through untouched, and
that with the exact denoiser of Gaussian and Gaussian-mixture data it lands on the true mean and variance, closer
as steps grow."""
import inspect
import re

import pytest
import torch
from sampler_oracles import SD, mixture

from openldm.diffusion.analytic import GaussianDenoiser, compare
from openldm.diffusion.spacing import make_plan
from openldm.nn.slots import Slots
from openldm.registry import SAMPLERS
from openldm.samplers import SamplerSpec, blend_known

EXPECTED = {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde"}
NAMES = sorted(EXPECTED)


def run(name, denoiser, x, plan, **kwargs):
    return SAMPLERS.get(name)(denoiser, x, plan.sigmas, **{**plan.options, **kwargs})


class Recording:
    """Wraps a denoiser, recording each call's x, sigma and cond."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, sigma, cond=None):
        self.calls.append((x.clone(), sigma.clone(), cond))
        return self.inner(x, sigma)


def test_every_expected_sampler_is_registered():
    assert EXPECTED <= set(SAMPLERS.names())
    for name in NAMES:
        assert isinstance(SAMPLERS.get(name), SamplerSpec)


@pytest.mark.parametrize("name", NAMES)
def test_signature_and_docstring(name):
    spec = SAMPLERS.get(name)
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:3] == ["denoiser", "x", "sigmas"]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in list(params.values())[:3])
    shared = {"cond": None, "generator": None, "on_step": None, "progress": False}
    for key, default in shared.items():
        assert params[key].kind == params[key].KEYWORD_ONLY and params[key].default is default, key
    for p in list(params.values())[3:]:  # sampler options: keyword-only, with defaults
        assert p.kind == p.KEYWORD_ONLY and p.default is not p.empty, p.name
    assert re.search(r"et al\.? 20\d\d", spec.fn.__doc__), "the docstring names the paper"


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name):
    den, plan = mixture((2, 3, 3)), make_plan(name, SD, 8)
    x = plan.initial_sample(torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)))
    x_before = x.clone()
    a = run(name, den, x, plan, generator=torch.Generator().manual_seed(1))
    b = run(name, den, x, plan, generator=torch.Generator().manual_seed(1))
    c = run(name, den, x, plan, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, x_before), "the input is not modified"
    assert torch.equal(a, b)
    assert a.isfinite().all() and a.shape == x.shape
    assert torch.equal(a, c) != SAMPLERS.get(name).stochastic  # only the stochastic ones depend on the seed


@pytest.mark.parametrize("name", NAMES)
def test_on_step_observes_every_step_and_can_replace_x(name):
    den, plan = Recording(mixture((2,))), make_plan(name, SD, 6)
    x = plan.initial_sample(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    seen, replacement = [], torch.full((4, 2), 0.25)
    sigmas = plan.sigmas.tolist()

    calls_before_replacement = []

    def hook(i, sigma, sigma_next, x_now, denoised):
        seen.append((i, sigma, sigma_next))
        assert x_now.shape == denoised.shape == (4, 2)
        if i == 2:
            calls_before_replacement.append(len(den.calls))
            return replacement.clone()
        return None

    run(name, den, x, plan, on_step=hook, generator=torch.Generator().manual_seed(0))
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == pytest.approx(sigmas[:-1]) and [s[2] for s in seen] == pytest.approx(sigmas[1:])
    # the first evaluation after step 2 is at sigma_3 and sees the replacement exactly
    x_next, sigma_next, _ = den.calls[calls_before_replacement[0]]
    assert float(sigma_next[0]) == pytest.approx(sigmas[3])
    assert torch.equal(x_next, replacement)
    # a hook on the last step sets the result
    final = run(name, den.inner, x, plan, on_step=lambda i, *a: replacement if i == 5 else None)
    assert torch.equal(final, replacement)


@pytest.mark.parametrize("name", NAMES)
def test_cond_passes_through_untouched(name):
    den, plan = Recording(mixture((2,))), make_plan(name, SD, 5)
    cond = Slots(vector=torch.randn(3, 7))
    run(name, den, plan.initial_sample(torch.randn(3, 2)), plan, cond=cond, generator=torch.Generator().manual_seed(0))
    assert den.calls and all(c[2] is cond for c in den.calls)
    assert all(c[1].shape == (3,) and c[1].dtype == torch.float32 for c in den.calls)  # sigma: (B,) float32


@pytest.mark.parametrize("name", NAMES)
def test_progress_bar_and_bad_sigmas(name, capsys):
    den, plan = mixture((2,)), make_plan(name, SD, 3)
    run(name, den, plan.initial_sample(torch.randn(2, 2)), plan, progress=True)
    assert "sampling" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sigmas"):
        SAMPLERS.get(name)(den, torch.randn(2, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        SAMPLERS.get(name)(den, torch.randn(2, 2), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("name", [n for n in NAMES if not SAMPLERS.get(n).stochastic])
def test_deterministic_samplers_converge_on_gaussian_data_exactly(name):
    """For N(mean, std^2) data the exact denoiser is affine, so a deterministic sampler maps x to
    mean + g (x - mean): running it on mean and on mean + sqrt(std^2 + sigma_0^2) (one standard deviation of the
    exact start) gives the output mean and variance exactly, with no sampling noise. The variance error shrinks as
    steps grow."""
    mean, std = torch.tensor([0.7, -0.2]), 0.5
    den = GaussianDenoiser(mean, std)
    errors = []
    for steps in (5, 10, 25, 50):
        plan = make_plan(name, SD, steps)
        sd0 = (std**2 + float(plan.sigmas[0]) ** 2) ** 0.5
        out = run(name, den, torch.stack([mean, mean + sd0]), plan)
        torch.testing.assert_close(out[0], mean, rtol=0, atol=1e-5)  # the mean is kept exactly
        var = ((out[1] - mean) ** 2).mean().item()
        errors.append(abs(var / std**2 - 1))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1, errors


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_lands_on_the_mixture(name):
    """Gaussian-mixture data, 4000 2-D points from the exact noisy marginal: mean, variance and mixture weights of
    the samples approach the truth as steps grow. (Sampling noise alone gives ~0.015 mean and ~2-4% variance error
    here; DDPM-like ancestral samplers converge slowest, ~18% variance error at 50 steps.)"""
    den = mixture((2,))
    scores = {}
    for steps in (5, 50):
        plan = make_plan(name, SD, steps, spacing="trailing")
        g = torch.Generator().manual_seed(0)
        out = run(name, den, den.sample(4000, g, sigma=float(plan.sigmas[0])), plan, generator=g)
        report = compare(out, den)
        scores[steps] = report.mean_error + report.variance_error
        if steps == 50:
            assert report.mean_error < 0.05 and report.variance_error < 0.2 and report.weight_error < 0.03, report
    assert scores[50] < scores[5], scores


@pytest.mark.parametrize("name", NAMES)
def test_inpainting_by_blending_keeps_the_known_part(name):
    """``blend_known`` re-imposes known + noise * sigma_next outside the mask after every step; at sigma 0 that is
    the known latents exactly, while the masked part is sampled."""
    den, plan = mixture((2, 3, 3)), make_plan(name, SD, 10)
    known = den.sample(2, torch.Generator().manual_seed(1)).reshape(2, 2, 3, 3)
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 1:, 1:] = 1.0  # generate the lower-right corner
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    out = run(name, den, plan.initial_sample(noise), plan, on_step=blend_known(known, mask, noise),
              generator=torch.Generator().manual_seed(3))
    keep = mask.expand_as(out) == 0
    assert torch.equal(out[keep], known[keep])
    assert not torch.allclose(out[~keep], known[~keep])


@pytest.mark.parametrize("name", NAMES)
def test_image_to_image_start(name):
    """Half strength: the input noised to the middle of the schedule, then the remaining steps take it back to the
    data (closer to it, in sliced Wasserstein distance, than the noised input)."""
    den = mixture((2,))
    plan = make_plan(name, SD, 20).from_strength(0.5)
    x0 = den.sample(1000, torch.Generator().manual_seed(0))
    noised = plan.noised_input(x0, torch.randn(1000, 2, generator=torch.Generator().manual_seed(1)))
    out = run(name, den, noised, plan, generator=torch.Generator().manual_seed(2))
    assert plan.num_steps == 10 and out.isfinite().all()
    assert compare(out, den).sliced_wasserstein < 0.5 * compare(noised, den).sliced_wasserstein
