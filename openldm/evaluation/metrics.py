"""Sample-quality metrics in pure torch: distribution distances in a feature space (FID, KID) and per-image
fidelity (PSNR, SSIM, mask IoU).

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule..."): the Frechet distance between
  Gaussians fitted to two feature sets.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 estimate with the cubic polynomial
  kernel, averaged over random subsets.
- SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity").

Statistics are computed in float64; features and images may come in any float dtype and on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_features(features: Tensor, name: str, min_rows: int = 2) -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} has shape {shape}; expected a 2-D (N, D) tensor of features")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} has {features.shape[0]} rows; at least {min_rows} are needed")
    if not features.is_floating_point():
        features = features.float()
    return features.to(torch.float64)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}; both sets must come from the "
                         f"same feature extractor")


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of ``features`` (N, D) with N >= 2."""
    x = _check_features(features, "features")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)  # (D, D), unbiased as numpy.cov
    return mu, sigma


def _sym_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; rounding can make tiny
    eigenvalues negative, they are clamped to 0."""
    w, v = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. in sec. 4):
    ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``.

    The matrix square roots come from symmetric eigendecompositions (no scipy, no complex parts); since
    ``S1^{1/2} S2 S1^{1/2}`` is similar to ``S1 S2``, this is the usual ``tr sqrtm(S1 S2)`` term."""
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise ValueError(f"{name} has shape {tuple(m.shape)}; expected ({d},) (mu1 sets the width)")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {tuple(s.shape)}; expected ({d}, {d}) to match the means")
    sigma2 = sigma2.to(sigma1.device)
    root1 = _sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    diff = mu1 - mu2.to(mu1.device)
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)  # a distance; rounding may leave -1e-13 for identical inputs


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    _check_pair(a, b)
    return frechet_distance(*feature_statistics(a), *feature_statistics(b.to(a.device)))


def _polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / D + 1)^3, the KID kernel (Binkowski et al. 2018, sec. 4)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 between equal-sized samples x, y (m, D): the within-set means skip the diagonal."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    off = m * (m - 1)
    return ((k_xx.sum() - k_xx.diagonal().sum()) / off + (k_yy.sum() - k_yy.diagonal().sum()) / off
            - 2 * k_xy.mean())


def kid(features_a: Tensor, features_b: Tensor, *, num_subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and standard deviation (population, as
    torch-fidelity reports it) of the unbiased MMD^2 over ``num_subsets`` random pairs of subsets, each drawn
    without replacement. ``subset_size`` is clipped to the smaller set. ``generator`` (a CPU generator) draws the
    subsets; None uses a fixed seed of 0, so the result is reproducible either way."""
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    _check_pair(a, b)
    if num_subsets < 1:
        raise ValueError(f"num_subsets={num_subsets}; it must be >= 1")
    if subset_size < 2:
        raise ValueError(f"subset_size={subset_size}; it must be >= 2")
    b = b.to(a.device)
    m = min(subset_size, a.shape[0], b.shape[0])
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    values = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:m].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator)[:m].to(a.device)
        values[i] = _mmd2_unbiased(a[ia], b[ib]).cpu()
    return float(values.mean()), float(values.std(unbiased=False))


def _check_images(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(f"images have shapes {tuple(x.shape)} and {tuple(y.shape)}; expected (B, C, H, W) both")
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} and {tuple(y.shape)}; they must be equal")
    return x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio (dB) per image of (B, C, H, W) batches: ``10 log10(data_range^2 / MSE)``;
    ``data_range`` 2 suits images in [-1, 1]. Identical images give +inf. Returns float64 (B,)."""
    x, y = _check_images(x, y)
    if data_range <= 0:
        raise ValueError(f"data_range={data_range}; it must be > 0")
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(data_range ** 2 / mse)


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (11 for sigma 1.5 is scipy's gaussian_filter at truncate=3.5,
    the window skimage uses)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image of (B, C, H, W) batches, float64 (B,).

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (co)variances, local statistics over
    'valid' positions only, the SSIM map averaged per channel and then over channels. This equals skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=0)`` per image."""
    x, y = _check_images(x, y)
    if data_range <= 0:
        raise ValueError(f"data_range={data_range}; it must be > 0")
    _, C, H, W = x.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"images of {H}x{W} px are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)
    window = (g[:, None] * g[None, :]).expand(C, 1, SSIM_WINDOW, SSIM_WINDOW)  # (C, 1, 11, 11) depthwise

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=C)  # (B, C, H - 10, W - 10)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union per mask of (B, H, W) batches. Boolean masks are used as they are; float masks
    are thresholded at 0.5 (value >= 0.5 is inside). Two empty masks agree perfectly: IoU 1. Returns float64 (B,)."""
    if pred.ndim != 3 or target.ndim != 3:
        raise ValueError(f"masks have shapes {tuple(pred.shape)} and {tuple(target.shape)}; expected (B, H, W) "
                         f"both (squeeze a channel dimension first)")
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(pred.shape)} and {tuple(target.shape)}; they must be equal")
    p = pred if pred.dtype == torch.bool else pred >= 0.5
    t = (target if target.dtype == torch.bool else target >= 0.5).to(p.device)
    inter = (p & t).flatten(1).sum(dim=1).to(torch.float64)
    union = (p | t).flatten(1).sum(dim=1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


__all__ = ["feature_statistics", "fid", "frechet_distance", "kid", "mask_iou", "psnr", "ssim"]
