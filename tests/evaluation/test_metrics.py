import math

import numpy as np
import pytest
import torch

from openldm.evaluation.metrics import feature_statistics, fid, frechet_distance, kid, mask_iou, psnr, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n samples of one fixed correlated Gaussian in d dimensions (the same for every seed), shifted by shift."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64) / math.sqrt(d)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The reference formula of pytorch-fid / the TTUR code: scipy.linalg.sqrtm of S1 S2."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_feature_statistics_match_numpy():
    x = _features(50, 6, 0)
    mu, sigma = feature_statistics(x.float())
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.float().double().numpy(), rowvar=False), rtol=1e-10)


def test_fid_matches_scipy_sqrtm_formula():
    a, b = _features(400, 16, 1), _features(300, 16, 2, shift=0.3)
    expected = _fid_scipy(a.numpy(), b.numpy())
    assert fid(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_fid_of_identical_sets_is_zero():
    a = _features(200, 32, 3) * 10
    assert abs(fid(a, a)) < 1e-6
    assert abs(fid(a, a[torch.randperm(200, generator=torch.Generator().manual_seed(0))])) < 1e-6


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # diagonal covariances commute: FID = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(float(expected), rel=1e-12)


def test_frechet_distance_handles_singular_covariance():
    # fewer samples than dimensions: rank-deficient covariances, eigenvalues rounding below zero are clamped
    a, b = _features(10, 32, 4), _features(10, 32, 5)
    value = fid(a, b)
    assert math.isfinite(value) and value > 0


def test_fid_and_statistics_errors():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid(torch.zeros(10), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="widths differ: 3 and 4"):
        fid(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="1 rows"):
        feature_statistics(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"sigma2 has shape \(2, 2\); expected \(3, 3\)"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(2))


def _kid_loop(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as the defining sums."""
    m, d = x.shape
    k = lambda a, b: (float(a @ b) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_direct_loop_on_full_sets():
    a, b = _features(12, 5, 6), _features(12, 5, 7, shift=0.5)
    # one subset of the whole set: the estimate does not depend on the order the subset is drawn in
    mean, std = kid(a, b, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_kid_loop(a, b), rel=1e-10)
    assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    a, b = _features(1000, 16, 8), _features(1000, 16, 9)
    same, same_std = kid(a, b, num_subsets=20, subset_size=500)
    shifted, _ = kid(a, _features(1000, 16, 9, shift=0.5), num_subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)


def test_kid_is_reproducible_and_uses_generator():
    a, b = _features(300, 8, 10), _features(200, 8, 11)
    r1 = kid(a, b, num_subsets=5, subset_size=50)
    assert r1 == kid(a, b, num_subsets=5, subset_size=50)
    g = torch.Generator().manual_seed(123)
    assert kid(a, b, num_subsets=5, subset_size=50, generator=g) != r1
    with pytest.raises(ValueError, match="num_subsets=0"):
        kid(a, b, num_subsets=0)
    with pytest.raises(ValueError, match="widths differ"):
        kid(a, b[:, :4])


def test_psnr_closed_form():
    x = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01
    y[1, :, :4] += 0.2  # MSE 0.02 (half the pixels off by 0.2)
    values = psnr(x, y)  # data_range 2
    assert values.shape == (3,)
    assert values[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-9)
    assert values[1].item() == pytest.approx(10 * math.log10(4 / 0.02), rel=1e-9)
    assert values[2].item() == math.inf
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0, rel=1e-9)


def test_ssim_of_identical_images_is_one_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    values = ssim(x, noisy)
    assert values.shape == (2,) and (values < 0.9).all()


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 24, 30, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(3):
        ref = metrics.structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=2.0, channel_axis=0)
        assert ours[i].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_image_metric_errors():
    with pytest.raises(ValueError, match="image shapes differ"):
        psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 15))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="data_range=0"):
        psnr(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), data_range=0)


def test_mask_iou_closed_form():
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    target = torch.zeros(4, 4, 4, dtype=torch.bool)
    pred[0, :2] = True  # 8 px
    target[0, 1:3] = True  # 8 px, 4 shared -> 4 / 12
    pred[1] = True
    target[1] = True  # identical -> 1
    target[2, 0, 0] = True  # empty prediction -> 0
    # mask 3: both empty -> 1
    iou = mask_iou(pred, target)
    assert iou.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 1.0])
    # floats are thresholded at 0.5
    assert mask_iou(pred.float() * 0.7, target.float() * 0.9).tolist() == pytest.approx(iou.tolist())
    assert mask_iou(pred.float() * 0.4, target.float())[1].item() == 0.0


def test_mask_iou_errors():
    with pytest.raises(ValueError, match="mask shapes differ"):
        mask_iou(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        mask_iou(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
