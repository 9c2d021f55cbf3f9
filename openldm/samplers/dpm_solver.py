"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), in sigma space with lambda = -log sigma (the half log-SNR)."""
from __future__ import annotations

import math

import torch

from openldm.nn.slots import Slots
from openldm.samplers.base import OnStep, after_step, check_sigmas, denoise, randn_like, steps

# diffusers drops to first order on the last step of schedules shorter than this (``lower_order_final``).
LOWER_ORDER_FINAL_BELOW = 15


def _first_order_last(lower_order_final: bool | None, num_steps: int) -> bool:
    return num_steps < LOWER_ORDER_FINAL_BELOW if lower_order_final is None else lower_order_final


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                    generator: torch.Generator | None = None, on_step: OnStep | None = None, progress: bool = False,
                    lower_order_final: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. 2022 (Algorithm 2).

    Data prediction, "midpoint" form, as diffusers' DPMSolverMultistepScheduler with solver_order=2: the update
    ``x_next = (sigma_next / sigma) x - expm1(-h) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1})``, h = lambda_next - lambda,
    r = h_prev / h. The first step is first order (DDIM), and so is the last when it ends at sigma 0 or, with
    ``lower_order_final`` (None: when fewer than 15 steps, as diffusers), always."""
    s = check_sigmas(sigmas)
    n = len(s) - 1
    first_order_last = _first_order_last(lower_order_final, n)
    old_denoised, h_prev = None, None
    for i in steps(n, progress):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised  # the first-order update with sigma_next = 0
        elif sigma_next != sigma:  # (a zero-length step, e.g. Karras down to a final sigma_min, leaves x as it is)
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None or not h_prev or (first_order_last and i == n - 1):
                d = denoised
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_prev = h
        old_denoised = denoised
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                        generator: torch.Generator | None = None, on_step: OnStep | None = None,
                        progress: bool = False, eta: float = 1.0, s_noise: float = 1.0,
                        lower_order_final: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the stochastic variant of Lu et al. 2022's second-order multistep solver.

    "Midpoint" form, as diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" (k-diffusion's
    ``sample_dpmpp_2m_sde``): per step, with h = lambda_next - lambda,
    ``x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + sigma_next sqrt(1 - e^{-2 eta h}) z``
    plus the multistep correction ``(1 - e^{-(1+eta) h}) / (2r) (D_i - D_{i-1})`` from the second step on. eta = 1 is
    the reference SDE; eta = 0 reduces to DPM-Solver++(2M). Fresh Gaussian noise is drawn (in float32, as the
    reference does) on every step that does not end at sigma 0."""
    s = check_sigmas(sigmas)
    n = len(s) - 1
    first_order_last = _first_order_last(lower_order_final, n)
    old_denoised, h_prev = None, None
    for i in steps(n, progress):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised
        elif sigma_next != sigma:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            a = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + a * denoised
            if old_denoised is not None and h_prev and not (first_order_last and i == n - 1):
                r = h_prev / h
                x = x + a * (0.5 / r) * (denoised - old_denoised)
            if eta > 0:
                noise = randn_like(x, generator, dtype=torch.float32)
                x = x + noise * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
            h_prev = h
        old_denoised = denoised
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x
