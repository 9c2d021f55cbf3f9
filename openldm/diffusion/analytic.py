"""Exact denoisers of Gaussian and Gaussian-mixture data, and a measure of how close samples come to such data.

For data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and x = x0 + sigma eps, the ideal denoiser (the posterior mean,
Karras et al. 2022, eq. 2's minimiser) is closed form:

    D(x, sigma) = sum_k p(k | x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    p(k | x) ∝ w_k N(x; mu_k, diag(s_k^2 + sigma^2)).

With it a sampler's only errors are its own (discretisation, start distribution), which makes these the oracles of
the sampler tests and of ``openldm demo``. Components are isotropic (one std each) or diagonal (one std per
coordinate); samples have shape (B, *event_shape), e.g. (B, 2) for 2-D points or (B, C, H, W).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class GaussianMixtureDenoiser(nn.Module):
    """``D(x, sigma, cond)`` for data ``sum_k weights[k] N(means[k], stds[k]^2)``.

    ``means``: (K, *event_shape); ``stds``: (K,) isotropic or (K, *event_shape) diagonal; ``weights``: (K,), normalised
    here (uniform when None). The condition is ignored. Computed in float64, returned in x's dtype."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor | float, weights: torch.Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means.shape)}")
        K, event = means.shape[0], means.shape[1:]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 0:
            stds = stds.expand(K)
        if stds.shape == (K,):
            stds = stds.view(K, *([1] * len(event))).expand(K, *event)
        if stds.shape != means.shape or (stds <= 0).any():
            raise ValueError(f"stds must be positive with shape ({K},) or {tuple(means.shape)}, "
                             f"got {tuple(stds.shape)}")
        if weights is None:
            weights = torch.ones(K)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum, got {weights.tolist()}")
        self.register_buffer("means", means)  # (K, *event)
        self.register_buffer("stds", stds.contiguous())  # (K, *event)
        self.register_buffer("weights", weights / weights.sum())  # (K,)

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    @property
    def mean(self) -> torch.Tensor:
        """(*event_shape) E[x0]."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    @property
    def variance(self) -> torch.Tensor:
        """(*event_shape) the per-coordinate variance Var[x0]."""
        second = torch.einsum("k,k...->...", self.weights, self.stds**2 + self.means**2)
        return second - self.mean**2

    def _sigma(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        return sigma.expand(x.shape[0]).view(-1, *([1] * len(self.event_shape)))  # (B, 1, ...)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """(B, K) p(k | x) for x = x0 + sigma eps."""
        x = x.to(torch.float64)
        s2 = self._sigma(sigma, x)[:, None] ** 2  # (B, 1, 1, ...)
        var = self.stds[None] ** 2 + s2  # (B, K, *event)
        dims = tuple(range(2, var.dim()))
        log_n = -0.5 * (((x[:, None] - self.means[None]) ** 2 / var).sum(dims) + var.log().sum(dims))  # (B, K)
        return torch.softmax(log_n + self.weights.log(), dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        xd = x.to(torch.float64)
        s2 = self._sigma(sigma, xd)[:, None] ** 2  # (B, 1, 1, ...)
        gain = self.stds[None] ** 2 / (self.stds[None] ** 2 + s2)  # (B, K, *event)
        post = self.means[None] + gain * (xd[:, None] - self.means[None])  # (B, K, *event) E[x0 | x, k]
        r = self.responsibilities(xd, sigma).view(*post.shape[:2], *([1] * len(self.event_shape)))
        return (r * post).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0) -> torch.Tensor:
        """(n, *event_shape) float32 draws of x0 + sigma eps (the exact noisy marginal at level sigma)."""
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        eps = torch.randn(n, *self.event_shape, generator=generator, dtype=torch.float64)
        x0 = self.means[k] + self.stds[k] * eps
        if sigma:
            x0 = x0 + sigma * torch.randn(n, *self.event_shape, generator=generator, dtype=torch.float64)
        return x0.float()


class GaussianDenoiser(GaussianMixtureDenoiser):
    """``D(x, sigma) = mean + std^2 / (std^2 + sigma^2) (x - mean)`` for data N(mean, std^2): ``mean`` of the event
    shape, ``std`` a number (isotropic) or of the event shape (diagonal)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | float):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        super().__init__(mean[None], std[None] if std.dim() else std.reshape(1), torch.ones(1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        xd = x.to(torch.float64)
        s2 = self._sigma(sigma, xd) ** 2
        var = self.stds[0] ** 2
        return (self.means[0] + var / (var + s2) * (xd - self.means[0])).to(x.dtype)


@dataclass(frozen=True)
class SampleReport:
    """How close samples are to a target distribution.

    - ``mean_error``: Euclidean norm of (sample mean - true mean);
    - ``variance_error``: largest relative error of a coordinate's variance, |var_hat - var| / var;
    - ``sliced_wasserstein``: sliced 2-Wasserstein distance to an exact sample of the same size;
    - ``sliced_wasserstein_floor``: the same between two exact samples (what sampling noise alone gives);
    - ``weight_error``: total variation between the mixture weights and the samples' mean responsibilities
      (an unbiased estimate of the weights under the target); 0 for one component.
    """

    mean_error: float
    variance_error: float
    sliced_wasserstein: float
    sliced_wasserstein_floor: float
    weight_error: float

    def __str__(self) -> str:
        return (f"mean err {self.mean_error:.4f}  var err {100 * self.variance_error:5.2f}%  "
                f"SW2 {self.sliced_wasserstein:.4f} (exact-sample floor {self.sliced_wasserstein_floor:.4f})  "
                f"weight err {self.weight_error:.4f}")


def _sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values  # (n, L)
    return float(((pa - pb) ** 2).mean().sqrt())


def compare(samples: torch.Tensor, target: GaussianMixtureDenoiser, generator: torch.Generator | None = None,
            num_projections: int = 64) -> SampleReport:
    """Measure ``samples`` (n, *event_shape) against the target data distribution (see ``SampleReport``)."""
    x = samples.detach().to(torch.float64).cpu().reshape(samples.shape[0], -1)
    n, d = x.shape
    mean, var = target.mean.reshape(-1).cpu(), target.variance.reshape(-1).cpu()
    mean_error = float((x.mean(0) - mean).norm())
    variance_error = float(((x.var(0) - var).abs() / var).max())
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    directions = torch.randn(d, num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    ref1 = target.sample(n, generator).to(torch.float64).reshape(n, -1)
    ref2 = target.sample(n, generator).to(torch.float64).reshape(n, -1)
    resp = target.responsibilities(samples.detach().cpu()).mean(0)
    return SampleReport(mean_error=mean_error, variance_error=variance_error,
                        sliced_wasserstein=_sliced_w2(x, ref1, directions),
                        sliced_wasserstein_floor=_sliced_w2(ref2, ref1, directions),
                        weight_error=float(0.5 * (resp - target.weights.cpu()).abs().sum()))
