"""The linear multistep (LMS) sampler of the probability-flow ODE in sigma space: the variable-step Adams-Bashforth
method (Hairer, Norsett and Wanner 1993, "Solving Ordinary Differential Equations I", III.5) on Karras et al. 2022's
dx/dsigma = (x - D(x, sigma)) / sigma, as k-diffusion's ``sample_lms`` and diffusers' LMSDiscreteScheduler."""
from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from openldm.nn.slots import Slots
from openldm.samplers.base import OnStep, after_step, check_sigmas, denoise, steps


def lms_coefficients(history: list[float], sigma_next: float) -> list[float]:
    """The weights of the last ``len(history)`` derivatives in a step from ``history[-1]`` to ``sigma_next``.

    ``history`` holds the (distinct) levels the derivatives were taken at, oldest first; weight ``j`` (newest first)
    is the integral over [sigma, sigma_next] of the Lagrange basis polynomial that is 1 at the j-th newest level and
    0 at the others. Computed exactly in float64, in the variable u = (tau - sigma) / h, h = sigma_next - sigma, which
    keeps the polynomials' coefficients of order one at any noise scale (the reference integrates the same
    polynomials numerically, with scipy's quad)."""
    sigma = history[-1]
    h = sigma_next - sigma
    nodes = (np.array(history[::-1], dtype=np.float64) - sigma) / h  # newest first; nodes[0] = 0
    coeffs = []
    for j in range(len(nodes)):
        others = np.delete(nodes, j)
        basis = P.polyfromroots(others) / np.prod(nodes[j] - others)  # 1 at u_j, 0 at the other nodes
        coeffs.append(h * float(P.polyval(1.0, P.polyint(basis))))  # polyint vanishes at u = 0
    return coeffs


@torch.no_grad()
def sample_lms(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
               generator: torch.Generator | None = None, on_step: OnStep | None = None, progress: bool = False,
               order: int = 4) -> torch.Tensor:
    """Linear multistep: the variable-step Adams-Bashforth method of order ``order`` on the probability-flow ODE
    (Karras et al. 2022, eq. 1 with the score of eq. 3).

    Each step evaluates the denoiser once and moves by ``sum_j c_j d_{i-j}``, the derivatives d = (x - D) / sigma of
    the last ``min(i + 1, order)`` steps weighted by ``lms_coefficients``; the first steps use the history there is
    (step 0 is an Euler step). As k-diffusion's ``sample_lms`` and diffusers' LMSDiscreteScheduler (default order 4).
    Run on a cut schedule (image-to-image) it starts again at first order, as k-diffusion does; diffusers instead
    asks for a full-order step from its begin index with one derivative."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    s = check_sigmas(sigmas)
    history: list[float] = []  # the levels of the derivatives kept, oldest first
    derivatives: list[torch.Tensor] = []
    for i in steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if history and history[-1] == sigma:  # a repeated level: its newer derivative replaces the older one
            history.pop()
            derivatives.pop()
        history.append(sigma)
        derivatives.append((x - denoised) / sigma)
        del history[:-order], derivatives[:-order]
        if sigma_next != sigma:  # (a zero-length step leaves x as it is)
            coeffs = lms_coefficients(history, sigma_next)
            x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x
