"""Inference schedules (openldm.diffusion.spacing) against the diffusers scheduler each sampler follows: identical
timesteps (values and dtype), identical float32 sigmas and the same initial noise scale, for every spacing, steps
offset, Karras option, final level, schedule kind (zero terminal SNR where diffusers has it) and several step counts;
and the image-to-image cut of diffusers' img2img pipelines."""
import itertools

import pytest
import torch
from sampler_oracles import SD, diffusers_scheduler, reference_schedule, schedule

from openldm.diffusion.schedules import make_alphas_cumprod
from openldm.diffusion.spacing import SPACINGS, make_plan
from openldm.registry import SAMPLERS

STEPS = (1, 2, 3, 4, 7, 10, 25, 50)
KINDS = [("scaled_linear", False), ("linear", False), ("cosine", False), ("scaled_linear", True), ("linear", True)]


def options(sampler):
    """(karras, final_sigma) combinations the sampler's diffusers counterpart supports."""
    karras = (False, True) if sampler in ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde") else (False,)
    finals = ("zero", "sigma_min") if sampler in ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_sde") else ("zero",)
    return list(itertools.product(karras, finals))


# Every (sampler, schedule) pair with a diffusers counterpart: HeunDiscreteScheduler has no zero-terminal-SNR option.
CASES = [(s, k, z) for s in ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde")
         for k, z in KINDS if not (z and s == "heun")]


@pytest.mark.parametrize("sampler,kind,zero_snr", CASES, ids=[f"{s}-{k}{'-zsnr' if z else ''}" for s, k, z in CASES])
def test_schedule_matches_diffusers(sampler, kind, zero_snr):
    config = schedule(kind, zero_snr)
    checked = 0
    for spacing, offset, (karras, final) in itertools.product(SPACINGS, (0, 1), options(sampler)):
        ref = diffusers_scheduler(sampler, config, spacing, offset, karras, final)
        for n in STEPS:
            ref.set_timesteps(n)
            ts, sigmas, init = reference_schedule(sampler, ref)
            plan = make_plan(sampler, config, n, spacing=spacing, steps_offset=offset, karras=karras, final_sigma=final)
            where = f"{spacing} offset={offset} karras={karras} final={final} N={n}"
            assert plan.timesteps.dtype == ts.dtype, where
            assert torch.equal(plan.timesteps, ts), f"{where}: {plan.timesteps} != {ts}"
            assert plan.sigmas.dtype == torch.float32
            assert torch.equal(plan.sigmas, sigmas.float()), f"{where}: {plan.sigmas} != {sigmas}"
            assert plan.init_noise_scale == pytest.approx(init, rel=1e-6), where
            assert plan.num_steps == n
            checked += 1
    assert checked >= 48


def test_known_values():
    """Stable Diffusion v1's usual schedules, written out (diffusers' documented behaviour, Lin et al. Table 2)."""
    assert make_plan("ddim", SD, 10).timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert make_plan("ddim", SD, 10, spacing="trailing").timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399,
                                                                                299, 199, 99]
    assert make_plan("euler", SD, 4, spacing="linspace").timesteps.tolist() == [999.0, 666.0, 333.0, 0.0]
    assert make_plan("dpmpp_2m", SD, 4).timesteps.tolist() == [801, 601, 401, 201]  # T // (N + 1) = 200
    plan = make_plan("euler", SD, 10, spacing="linspace")
    assert plan.sigmas[0] == pytest.approx(14.6146, abs=1e-4) and plan.sigmas[-1] == 0
    assert plan.init_noise_scale == pytest.approx(14.6146, abs=1e-4)  # Euler's sigma_max for linspace
    leading = make_plan("euler", SD, 10)
    assert leading.init_noise_scale == pytest.approx((float(leading.sigmas[0]) ** 2 + 1) ** 0.5)  # ... and for leading


def test_euler_ancestral_karras_follows_euler():
    """diffusers' EulerAncestralDiscreteScheduler has no Karras option; ours takes the Euler scheduler's rule."""
    for spacing in SPACINGS:
        a = make_plan("euler_ancestral", SD, 12, spacing=spacing, karras=True)
        b = make_plan("euler", SD, 12, spacing=spacing, karras=True)
        assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)


def test_ddim_prev_sigmas_only_where_diffusers_steps_off_its_list():
    """diffusers' DDIM steps to t - T // N; where that is not the next listed timestep the plan says so."""
    assert "prev_sigmas" not in make_plan("ddim", SD, 10).options  # leading: always consistent
    assert "prev_sigmas" not in make_plan("ddim", SD, 10, spacing="trailing").options  # N divides T
    plan = make_plan("ddim", SD, 3, spacing="trailing")  # 999, 666, 332: 666 -> 333, not 332
    assert plan.timesteps.tolist() == [999, 666, 332]
    table = make_plan("ddpm", SD, 1000, spacing="linspace").sigmas.flip(0)[1:]  # sigma of t = 0..999
    assert plan.options["prev_sigmas"].tolist() == [table[666].item(), table[333].item(), 0.0]
    plan = make_plan("ddim", SD, 10, spacing="linspace")  # 999, 888, ...: lands on 899, evaluates at 888
    assert plan.options["prev_sigmas"][0].item() == table[899].item()
    assert plan.sigmas[1].item() == table[888].item()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_from_strength_matches_img2img_cut(sampler, strength):
    """diffusers' img2img: init = min(int(N s), N), t_start = N - init, timesteps[t_start * order:]."""
    n = 20
    ref = diffusers_scheduler(sampler, SD)
    ref.set_timesteps(n)
    init = min(int(n * strength), n)
    t_start = n - init
    ts = ref.timesteps[t_start * ref.order:]
    plan = make_plan(sampler, SD, n).from_strength(strength)
    assert plan.num_steps == init
    if sampler == "heun":  # interleaved: [t_k, t_{k+1}, t_{k+1}, ...]
        ts = torch.cat([ts[:1], ts[1::2]])
    assert torch.equal(plan.timesteps, ts)
    full = make_plan(sampler, SD, n)
    assert torch.equal(plan.sigmas, full.sigmas[t_start:])
    # noising the input to the first remaining level is diffusers' add_noise at the first remaining timestep
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    noised = ref.add_noise(x0, noise, ts[:1])
    sigma0 = float(plan.sigmas[0])
    ours = plan.noised_input(x0, noise)
    if sampler in ("ddim", "dpmpp_2m"):  # VP: x_t = x_sigma / sqrt(1 + sigma^2)
        ours = ours / (1 + sigma0**2) ** 0.5
    torch.testing.assert_close(ours, noised, rtol=1e-5, atol=1e-6)


def test_from_strength_keeps_ddim_prev_sigmas_aligned():
    plan = make_plan("ddim", SD, 10, spacing="linspace")
    cut = plan.from_strength(0.5)
    assert torch.equal(cut.options["prev_sigmas"], plan.options["prev_sigmas"][5:])
    assert cut.num_steps == 5


def test_dpm_lower_order_final_follows_the_full_schedule():
    assert make_plan("dpmpp_2m", SD, 10).options["lower_order_final"] is True
    assert make_plan("dpmpp_2m", SD, 20).options["lower_order_final"] is False
    assert make_plan("dpmpp_2m", SD, 20).from_strength(0.5).options["lower_order_final"] is False


def test_bad_arguments_are_errors_that_name_the_value():
    with pytest.raises(ValueError, match="spacing 'middle'"):
        make_plan("euler", SD, 10, spacing="middle")
    with pytest.raises(ValueError, match="Karras"):
        make_plan("ddim", SD, 10, karras=True)
    with pytest.raises(ValueError, match="final_sigma 'sigma_min'"):
        make_plan("heun", SD, 10, final_sigma="sigma_min")
    with pytest.raises(ValueError, match="num_steps"):
        make_plan("euler", SD, 0)
    with pytest.raises(ValueError, match="outside"):  # diffusers silently clamps t = 1000 here
        make_plan("dpmpp_2m", SD, 999, steps_offset=1)
    with pytest.raises(KeyError, match="unknown sampler 'unipc'"):
        make_plan("unipc", SD, 10)
    with pytest.raises(ValueError, match="strength"):
        make_plan("euler", SD, 10).from_strength(0.0)
    with pytest.raises(ValueError, match="keeps no step"):
        make_plan("euler", SD, 10).from_strength(0.05)


def test_accepts_alphas_cumprod_and_every_registered_sampler():
    ab = make_alphas_cumprod(SD)
    for name in SAMPLERS.names():
        plan = make_plan(name, ab, 8)
        assert plan.sigmas.shape == (9,) and plan.timesteps.shape == (8,)
        assert torch.equal(plan.sigmas, make_plan(name, SD, 8).sigmas)
