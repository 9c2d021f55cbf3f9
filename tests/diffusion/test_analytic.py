"""The exact denoisers of Gaussian and Gaussian-mixture data, and the closeness report."""
import math

import pytest
import torch

from openldm.diffusion.analytic import (
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    compare,
)


def mixture_1d():
    return GaussianMixtureDenoiser(torch.tensor([[-1.5], [0.5], [2.0]]), torch.tensor([0.3, 0.5, 0.2]),
                                   torch.tensor([0.2, 0.5, 0.3]))


def test_mixture_denoiser_is_the_posterior_mean_by_quadrature():
    """E[x0 | x] = int x0 p(x0) N(x; x0, sigma^2) dx0 / int p(x0) N(x; x0, sigma^2) dx0, on a fine grid."""
    mix = mixture_1d()
    grid = torch.linspace(-6, 6, 60001, dtype=torch.float64)
    prior = sum(w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / s for m, s, w in
                zip(mix.means[:, 0], mix.stds[:, 0], mix.weights))
    x = torch.tensor([[-2.0], [-0.3], [0.9], [3.0]])
    for sigma in (0.05, 0.4, 1.5, 10.0):
        lik = torch.exp(-0.5 * ((x.double() - grid) / sigma) ** 2)  # (4, G)
        expected = (lik * prior * grid).sum(1) / (lik * prior).sum(1)
        torch.testing.assert_close(mix(x, sigma)[:, 0].double(), expected, rtol=1e-5, atol=1e-5)


def test_tweedie_formula():
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie / Karras et al. eq. 3)."""
    mix = GaussianMixtureDenoiser(torch.tensor([[0.0, 1.0], [1.5, -1.0]]), torch.tensor([[0.3, 0.6], [0.5, 0.2]]),
                                  torch.tensor([0.4, 0.6]))  # diagonal components
    sigma = 0.7
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    var = mix.stds**2 + sigma**2  # (K, 2)
    log_p = torch.logsumexp(mix.weights.log() - 0.5 * (((x[:, None] - mix.means) ** 2 / var) + var.log()).sum(-1), 1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(mix(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=1e-10, atol=1e-10)


def test_gaussian_denoiser_closed_form_and_limits():
    g = GaussianDenoiser(torch.tensor([1.0, -2.0]), 0.5)
    x = torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(g(x, 1.0), torch.tensor([[1.0, -2.0]]) + 0.25 / 1.25 * (x - torch.tensor([1.0, -2.0])))
    torch.testing.assert_close(g(x, 1e-4), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(g(x, 1e4), torch.tensor([[1.0, -2.0]]), rtol=0, atol=1e-6)
    as_mixture = GaussianMixtureDenoiser(torch.tensor([[1.0, -2.0]]), torch.tensor([0.5]))
    torch.testing.assert_close(g(x, torch.tensor([0.8])), as_mixture(x, torch.tensor([0.8])))


def test_moments_sampling_and_responsibilities():
    mix = mixture_1d()
    g = torch.Generator().manual_seed(0)
    n = 200000
    x0 = mix.sample(n, g)
    assert x0.mean().item() == pytest.approx(mix.mean.item(), abs=4 * math.sqrt(mix.variance.item() / n))
    assert x0.var().item() == pytest.approx(mix.variance.item(), rel=0.02)
    noisy = mix.sample(n, g, sigma=2.0)
    assert noisy.var().item() == pytest.approx(mix.variance.item() + 4.0, rel=0.02)
    resp = mix.responsibilities(x0[:5000])
    torch.testing.assert_close(resp.sum(1), torch.ones(5000, dtype=torch.float64))
    torch.testing.assert_close(resp.mean(0), mix.weights, rtol=0, atol=0.02)


def test_compare_reports_closeness():
    mix = GaussianMixtureDenoiser(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.3, 0.4]),
                                  torch.tensor([0.3, 0.7]))
    exact = compare(mix.sample(4000, torch.Generator().manual_seed(1)), mix)
    assert exact.mean_error < 0.05 and exact.variance_error < 0.1 and exact.weight_error < 0.03
    assert exact.sliced_wasserstein < 3 * exact.sliced_wasserstein_floor
    shifted = compare(mix.sample(4000, torch.Generator().manual_seed(1)) + torch.tensor([0.3, 0.0]), mix)
    assert shifted.mean_error == pytest.approx(0.3, abs=0.05) and shifted.sliced_wasserstein > 0.1
    collapsed = compare(mix.sample(4000, torch.Generator().manual_seed(1)) * 0.5, mix)
    assert collapsed.variance_error > 0.5
    assert "mean err" in str(exact)


def test_bad_arguments():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureDenoiser(torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureDenoiser(torch.zeros(2, 3), torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser(torch.zeros(2, 3), 0.5, torch.tensor([1.0, 2.0, 3.0]))
