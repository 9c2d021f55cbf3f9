"""Training targets and loss weights: epsilon, v (Salimans & Ho 2022) and x0 prediction, conversions between
them, uniform timestep sampling, min-SNR-gamma weighting (Hang et al. 2023) and offset noise.

All conversions work in the variance-preserving space ``x_t = a x_0 + s eps`` with ``a = sqrt(alpha_bar_t)``,
``s = sqrt(1 - alpha_bar_t)``, and ``v = a eps - s x_0``.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("eps", "v", "x0")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction!r} is not one of {PREDICTION_TYPES}")


def _ab(alpha_bar: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = alpha_bar.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What a network trained with ``prediction`` should output for clean ``x0`` noised with ``eps``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, s = _ab(alpha_bar, x0)
    return a * eps - s * x0


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean-data estimate implied by a network ``output`` at ``x_t``."""
    _check_prediction(prediction)
    if prediction == "x0":
        return output
    a, s = _ab(alpha_bar, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a
    return a * x_t - s * output  # v


def to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The noise estimate implied by a network ``output`` at ``x_t``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return output
    a, s = _ab(alpha_bar, x_t)
    if prediction == "x0":
        return (x_t - a * output) / s
    return s * x_t + a * output  # v


def sample_timesteps(batch: int, num_train_steps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [0, T)."""
    return torch.randint(0, num_train_steps, (batch,), generator=generator, device=device)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1 - alpha_bar)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): the x0-space weight ``min(SNR, gamma)`` expressed for the chosen target —
    ``/ SNR`` for eps, ``/ (SNR + 1)`` for v."""
    _check_prediction(prediction)
    r = snr(alpha_bar)
    clipped = torch.minimum(r, torch.full_like(r, gamma))
    if prediction == "eps":
        return clipped / r
    if prediction == "v":
        return clipped / (r + 1)
    return clipped


def offset_noise(shape: tuple[int, ...], strength: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise plus ``strength`` times a per-(sample, channel) constant (Guttenberg 2023, "offset noise"),
    which lets a model learn to change an image's overall brightness."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator, device=device, dtype=dtype)
    return noise
