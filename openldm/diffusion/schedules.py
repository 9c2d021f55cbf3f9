"""Noise schedules: betas, alpha_bar (alphas_cumprod), sigmas, Karras sigmas, and the closed-form forward process.

Two parametrisations of the same process are used throughout:

- variance preserving (DDPM, Ho et al. 2020): ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``,
  the space the network sees and is trained in;
- variance exploding / sigma space (Karras et al. 2022, "EDM"): ``x = x_0 + sigma eps`` with
  ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, the space every sampler integrates in.
  ``x_sigma = x_t / sqrt(alpha_bar_t)``.

Tensors are computed in float32 the way diffusers does, so one scheduler config gives bit-identical numbers here
and there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


@dataclass
class ScheduleConfig:
    """The training noise schedule. Defaults are Stable Diffusion v1's."""

    kind: str = "scaled_linear"  # linear | scaled_linear | cosine
    num_train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False  # rescale so alpha_bar_T = 0 (Lin et al. 2023, Algorithm 1)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is not one of {SCHEDULE_KINDS}")
        if self.num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {self.num_train_steps}")


def cosine_betas(num_steps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Betas whose alpha_bar follows ``cos((t/T + s) / (1 + s) * pi/2)^2`` (Nichol & Dhariwal 2021, eq. 17),
    each clipped at ``max_beta`` (diffusers' ``squaredcos_cap_v2``)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR and the first is unchanged
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 betas for the configured schedule."""
    T = config.num_train_steps
    if config.kind == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.kind == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(T)
    if config.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1.0 - make_betas(config), dim=0)


# With zero terminal SNR alpha_bar_T is 0 and sigma_T infinite; like diffusers, sample from a tiny positive value.
MIN_ALPHA_BAR = 2.0**-24


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level in sigma space. An alpha_bar of exactly 0
    (zero terminal SNR) is read as MIN_ALPHA_BAR, as diffusers does; tiny positive values (the cosine schedule's last
    step, ~2e-9) are kept, also as diffusers does."""
    ab = torch.where(alphas_cumprod > 0, alphas_cumprod, torch.full_like(alphas_cumprod, MIN_ALPHA_BAR))
    return ((1 - ab) / ab) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigmas_from_alphas_cumprod`: alpha_bar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigmas**2)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``num_steps`` sigmas from sigma_max to sigma_min evenly spaced in sigma^(1/rho).
    Computed in float64 (as diffusers does in NumPy); no trailing zero."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma, by linear interpolation in log sigma over the training table
    (k-diffusion's and diffusers' ``_sigma_to_t``). Sigmas outside the table clamp to its ends."""
    log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log()
    dists = log_sigma[None] - log_sigmas.reshape(-1, *([1] * log_sigma.dim()))  # (T, *sigma.shape)
    low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).to(sigma.dtype)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at (fractional) timestep ``t``, linear interpolation in sigma as diffusers' ``np.interp`` does."""
    t = t.to(torch.float64).clamp(0, sigmas.shape[0] - 1)
    low = t.floor().long().clamp(max=sigmas.shape[0] - 2)
    w = t - low
    s = sigmas.to(torch.float64)
    return (1 - w) * s[low] + w * s[low + 1]


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Closed-form forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4),
    for integer timesteps ``t`` of shape (B,)."""
    ab = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
