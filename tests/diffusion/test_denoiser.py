"""DiscreteDenoiser: an eps-, v- or x0-predicting network on a discrete VP schedule turned into D(x, sigma, cond)."""
import pytest
import torch

from openldm.diffusion.analytic import GaussianMixtureDenoiser
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import (
    ScheduleConfig,
    make_alphas_cumprod,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from openldm.nn.slots import Slots

AB = make_alphas_cumprod(ScheduleConfig())
DATA = GaussianMixtureDenoiser(torch.tensor([[1.0, -0.5, 0.2], [-0.8, 0.4, 0.0]]).view(2, 3, 1, 1).expand(2, 3, 2, 2),
                               torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.7]))


class IdealNet(torch.nn.Module):
    """The exact network for DATA: maps its (fractional) timestep back to sigma by the inverse of sigma_to_t (log
    sigma interpolated linearly), and predicts eps, v or x0. Records its inputs."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction, self.seen = prediction, []
        self.log_sigmas = sigmas_from_alphas_cumprod(AB).log().double()

    def forward(self, x_t, t, **slots):
        self.seen.append((x_t, t, slots))
        low = t.double().floor().long().clamp(max=998)
        w = t.double() - low
        sigma = ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp().float()
        s = sigma.view(-1, 1, 1, 1)
        x = x_t * (1 + s**2).sqrt()
        x0 = DATA(x, sigma)
        eps = (x - x0) / s
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return (eps - s * x0) / (1 + s**2).sqrt()  # v = alpha eps - sigma_t x0 in VP terms


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_recovers_the_exact_denoiser(prediction):
    net = IdealNet(prediction)
    den = DiscreteDenoiser(net, AB, prediction)
    g = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.3, 1.0, 3.7, 14.0):
        x = DATA.sample(6, g, sigma=sigma).view(6, 3, 2, 2)
        torch.testing.assert_close(den(x, torch.full((6,), sigma)), DATA(x, sigma), rtol=1e-4, atol=1e-5)


def test_network_inputs_c_in_timestep_and_slots():
    net = IdealNet("eps")
    den = DiscreteDenoiser(net, AB, "eps")
    table = sigmas_from_alphas_cumprod(AB)
    sigma = torch.stack([table[0], table[500], torch.tensor(2.0)])
    x = torch.randn(3, 3, 2, 2)
    cond = Slots(vector=torch.randn(3, 5), context=torch.randn(3, 7, 8))
    den(x, sigma, cond)
    x_t, t, slots = net.seen[-1]
    torch.testing.assert_close(x_t, x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt())  # c_in = 1 / sqrt(sigma^2 + 1)
    torch.testing.assert_close(t[:2], torch.tensor([0.0, 500.0]), rtol=0, atol=1e-3)  # table sigmas -> their steps
    torch.testing.assert_close(t[2:], sigma_to_t(sigma[2:], table.log()))
    assert set(slots) == {"vector", "context"} and slots["vector"] is cond.vector
    out_scalar = den(x[:1], torch.tensor(2.0))  # a 0-d sigma is broadcast
    torch.testing.assert_close(out_scalar, den(x[:1], torch.tensor([2.0])))
    assert den.sigma_min == pytest.approx(table[0].item()) and den.sigma_max == pytest.approx(table[-1].item())


def test_quantize_feeds_integer_timesteps():
    net = IdealNet("eps")
    table = sigmas_from_alphas_cumprod(AB)
    sigma = torch.tensor([0.5 * (table[10] + table[11]).item(), 3.0])
    DiscreteDenoiser(net, AB, "eps", quantize=True)(torch.randn(2, 3, 2, 2), sigma)
    t = net.seen[-1][1]
    torch.testing.assert_close(t, sigma_to_t(sigma, table.log()).round())
    assert torch.equal(t, t.round())


def test_v_conversion_is_diffusers_euler_formula():
    """diffusers' Euler: x0 = v * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)."""
    v = torch.randn(2, 3, 2, 2)
    den = DiscreteDenoiser(lambda x_t, t: v, AB, "v")
    x, sigma = torch.randn(2, 3, 2, 2) * 3, torch.tensor([2.5, 0.7])
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(den(x, sigma), v * (-s / (s**2 + 1).sqrt()) + x / (s**2 + 1))


def test_unknown_prediction_is_an_error():
    with pytest.raises(ValueError, match="'score'"):
        DiscreteDenoiser(torch.nn.Identity(), AB, "score")
