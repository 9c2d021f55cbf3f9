"""Classifier-free guidance as a denoiser wrapper: the formula from two separate calls, one batched network call per
evaluation, the scale-1 shortcut, guidance rescale against diffusers' rescale_noise_cfg, and a guided Euler run
against diffusers' EulerDiscreteScheduler with guidance done the pipeline's way."""
import pytest
import torch
from sampler_oracles import SD, diffusers

from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import make_alphas_cumprod, t_to_sigma
from openldm.diffusion.spacing import make_plan
from openldm.nn.slots import Slots
from openldm.samplers import CFGDenoiser, rescale_guidance, sample_euler

rescale_noise_cfg = pytest.importorskip(
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").rescale_noise_cfg


class CondNet(torch.nn.Module):
    """An ideal network for data N(c, 0.5^2) per coordinate, c the condition vector broadcast over (C, H, W);
    predicts eps or v from (x_t, t, vector=c) like a UNet, counting its calls and batch sizes."""

    def __init__(self, alphas_cumprod, prediction="eps"):
        super().__init__()
        self.table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.prediction, self.batches = prediction, []

    def forward(self, x_t, t, vector):
        self.batches.append(x_t.shape[0])
        sigma = t_to_sigma(t.reshape(-1).double(), self.table).float().view(-1, 1, 1, 1)
        c = vector.view(-1, x_t.shape[1], 1, 1)
        x = x_t * (1 + sigma**2).sqrt()
        x0 = c + 0.25 / (0.25 + sigma**2) * (x - c)
        eps = (x - x0) / sigma
        if self.prediction == "eps":
            return eps
        a, s = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        return a * eps - s * x0


@pytest.fixture
def setup():
    ab = make_alphas_cumprod(SD)
    net = CondNet(ab)
    den = DiscreteDenoiser(net, ab, "eps")
    cond = Slots(vector=torch.tensor([[1.0, -1.0], [0.5, 0.0], [2.0, 1.0]]))
    uncond = Slots(vector=torch.zeros(3, 2))
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([2.5, 2.5, 2.5])
    return net, den, cond, uncond, x, sigma


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_output_is_the_guidance_formula_from_one_batched_call(setup, scale):
    net, den, cond, uncond, x, sigma = setup
    d_cond, d_uncond = den(x, sigma, cond), den(x, sigma, uncond)
    net.batches.clear()
    out = CFGDenoiser(den, uncond, scale)(x, sigma, cond)
    assert net.batches == [6], "one network call, conditional and unconditional batched together"
    torch.testing.assert_close(out, d_uncond + scale * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)


def test_scale_one_skips_the_unconditional_pass(setup):
    net, den, cond, uncond, x, sigma = setup
    net.batches.clear()
    out = CFGDenoiser(den, uncond, 1.0)(x, sigma, cond)
    assert net.batches == [3]
    torch.testing.assert_close(out, den(x, sigma, cond))


def test_uncond_of_batch_one_is_repeated_and_scalar_sigma_is_accepted(setup):
    net, den, cond, uncond, x, sigma = setup
    out = CFGDenoiser(den, Slots(vector=torch.zeros(1, 2)), 5.0)(x, torch.tensor(2.5), cond)
    torch.testing.assert_close(out, CFGDenoiser(den, uncond, 5.0)(x, sigma, cond))
    with pytest.raises(ValueError, match="cond is None"):
        CFGDenoiser(den, uncond, 5.0)(x, sigma, None)
    with pytest.raises(ValueError, match="guidance_rescale"):
        CFGDenoiser(den, uncond, 5.0, guidance_rescale=1.5)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.7, 1.0])
def test_rescale_matches_diffusers_rescale_noise_cfg(setup, phi):
    """On the noise prediction: eps = (x - D) / sigma, rescaled, D = x - sigma eps."""
    net, den, cond, uncond, x, sigma = setup
    s = sigma.view(-1, 1, 1, 1)
    eps_c, eps_u = (x - den(x, sigma, cond)) / s, (x - den(x, sigma, uncond)) / s
    eps = rescale_noise_cfg(eps_u + 7.5 * (eps_c - eps_u), eps_c, guidance_rescale=phi)
    out = CFGDenoiser(den, uncond, 7.5, guidance_rescale=phi)(x, sigma, cond)
    torch.testing.assert_close(out, x - s * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rescale_guidance(eps_u + 7.5 * (eps_c - eps_u), eps_c, phi), eps, rtol=1e-6, atol=1e-6)


def test_rescale_in_v_space_matches_diffusers_on_a_v_network():
    """diffusers applies rescale_noise_cfg to the network's output; for a v network that is v."""
    ab = make_alphas_cumprod(SD)
    net = CondNet(ab, "v")
    den = DiscreteDenoiser(net, ab, "v")
    cond, uncond = Slots(vector=torch.tensor([[1.0, -1.0]])), Slots(vector=torch.zeros(1, 2))
    x, sigma = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2, torch.tensor([1.7])
    c_in = 1 / (1 + 1.7**2) ** 0.5
    t = den.sigma_to_t(sigma)
    v_c, v_u = net(x * c_in, t, cond.vector), net(x * c_in, t, uncond.vector)
    v = rescale_noise_cfg(v_u + 6.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
    expected = x * c_in**2 - 1.7 * c_in * v  # x0 from v, as DiscreteDenoiser computes it
    out = CFGDenoiser(den, uncond, 6.0, guidance_rescale=0.7, rescale_space="v")(x, sigma, cond)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_guided_euler_matches_diffusers_pipeline_loop():
    """Euler over CFGDenoiser(DiscreteDenoiser(net)) vs EulerDiscreteScheduler with the pipeline's guidance on the
    eps predictions (uncond and cond batched) and rescale, same net."""
    ab = make_alphas_cumprod(SD)
    net = CondNet(ab)
    # (Conditions chosen so the guided prediction never nearly vanishes: rescale divides by its std, which would
    # amplify float32 rounding on either side.)
    cond, uncond = Slots(vector=torch.tensor([[0.4, -0.3], [0.3, 0.2]])), Slots(vector=torch.zeros(2, 2))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(15)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x_in = ref.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = net(x_in, t.expand(4), torch.cat([uncond.vector, cond.vector])).chunk(2)
        eps = rescale_noise_cfg(eps_u + 5.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.5)
        x = ref.step(eps, t, x).prev_sample
    plan = make_plan("euler", SD, 15)
    den = CFGDenoiser(DiscreteDenoiser(net, ab, "eps"), uncond, 5.0, guidance_rescale=0.5)
    ours = sample_euler(den, plan.initial_sample(noise), plan.sigmas, cond=cond)
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)
