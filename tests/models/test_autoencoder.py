"""KL and VQ autoencoders: parameter count, preset shapes, the Gaussian posterior against closed forms, size
errors, tiling, and overfitting a handful of generated images. (Agreement with diffusers on identical weights is
in tests/io/test_keymap_autoencoder.py.)"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from openldm.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    VQAutoencoder,
    VQModelConfig,
    ldm_vq_f4,
    sd_autoencoder_kl,
    small_autoencoder_kl,
    small_vq,
    tiled_apply,
    tiny_autoencoder_kl,
    tiny_vq,
)
from openldm.registry import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = [sd_autoencoder_kl, small_autoencoder_kl, tiny_autoencoder_kl, ldm_vq_f4, small_vq, tiny_vq]
FACTORS = {"sd_autoencoder_kl": 8, "small_autoencoder_kl": 4, "tiny_autoencoder_kl": 4, "ldm_vq_f4": 4, "small_vq": 4, "tiny_vq": 4}
OVERFIT = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1)  # the smallest useful topology: f = 2


def build(cfg: AutoencoderKLConfig | VQModelConfig) -> AutoencoderKL | VQAutoencoder:
    return (AutoencoderKL if isinstance(cfg, AutoencoderKLConfig) else VQAutoencoder)(cfg)


def patterns(n: int = 8, size: int = 32) -> torch.Tensor:
    """n distinct (3, size, size) images in [-1, 1]: sinusoids of several frequencies and a moving disc."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for i in range(n):
        r = torch.sin(math.pi * (1 + i % 4) * xx + i)
        g = torch.cos(math.pi * (1 + i // 4) * yy - i)
        b = ((xx - 0.1 * i + 0.3) ** 2 + yy**2 < 0.25).float() * 2 - 1
        images.append(torch.stack([r, g, b]))
    return torch.stack(images)  # (n, 3, size, size)


# ----------------------------------------------------------------------------------------------- structure
def test_sd_parameter_count_is_exact():
    with torch.device("meta"):
        model = AutoencoderKL(sd_autoencoder_kl())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.__name__)
def test_preset_shapes(preset):
    cfg = preset()
    f = FACTORS[preset.__name__]
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        model = build(cfg).eval()
        assert model.downsampling_factor == f
        x = torch.empty(2, cfg.in_channels, 8 * f, 12 * f)
        latent_channels = cfg.z_channels if isinstance(cfg, AutoencoderKLConfig) else cfg.embed_dim
        enc = model.encode(x)
        z = enc.mean if isinstance(enc, DiagonalGaussian) else enc
        assert z.shape == (2, latent_channels, 8, 12)
        assert model.decode(z).shape == (2, cfg.out_channels, 8 * f, 12 * f)
        assert model(x)[0].shape == x.shape


@pytest.mark.parametrize("preset", [tiny_autoencoder_kl, tiny_vq], ids=lambda p: p.__name__)
def test_tiny_presets_run_on_any_multiple_of_the_factor(preset):
    model = build(preset(in_channels=1, out_channels=1)).eval()
    with torch.no_grad():
        for h, w in [(28, 28), (32, 48), (4, 8)]:  # MNIST size, non-square, the smallest
            recon, _ = model(torch.randn(1, 1, h, w))
            assert recon.shape == (1, 1, h, w) and torch.isfinite(recon).all()


def test_registered_and_configurable_from_plain_values():
    assert MODELS.get("autoencoder_kl") is AutoencoderKL and AutoencoderKL.config_class is AutoencoderKLConfig
    assert MODELS.get("vq_autoencoder") is VQAutoencoder and VQAutoencoder.config_class is VQModelConfig
    cfg = AutoencoderKLConfig(channel_mult=[1, 2])  # as YAML gives it
    assert cfg.channel_mult == (1, 2) and dataclasses.asdict(cfg)["channel_mult"] == (1, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        AutoencoderKLConfig(channel_mult=(1, 0))
    with pytest.raises(ValueError, match="z_channels must be >= 1, got 0"):
        VQModelConfig(z_channels=0)


# ----------------------------------------------------------------------------------------------- posterior
def test_posterior_kl_nll_and_sampling_match_closed_forms():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 5, 6, generator=g)
    other = DiagonalGaussian(torch.randn(3, 8, 5, 6, generator=g))
    post = DiagonalGaussian(moments)
    normal = torch.distributions.Normal(post.mean, post.std)
    prior = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    kl_prior = torch.distributions.kl_divergence(normal, prior).sum(dim=(1, 2, 3))
    kl_other = torch.distributions.kl_divergence(normal, torch.distributions.Normal(other.mean, other.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), kl_prior)
    torch.testing.assert_close(post.kl(other), kl_other)
    z = torch.randn(3, 4, 5, 6, generator=g)
    torch.testing.assert_close(post.nll(z), -normal.log_prob(z).sum(dim=(1, 2, 3)))
    assert post.kl().shape == (3,)
    assert torch.equal(post.mode(), moments[:, :4])
    # Reparameterised sampling: reproducible from a seed, with the right moments.
    a, b = post.sample(torch.Generator().manual_seed(7)), post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    wide = DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), math.log(0.25))], 1))
    s = wide.sample(torch.Generator().manual_seed(0))
    assert s.mean().item() == pytest.approx(2.0, abs=0.01) and s.std().item() == pytest.approx(0.5, abs=0.01)
    # log-variance is clamped to [-30, 20] as in CompVis, so exp() stays finite
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 1e4)).var.isfinite().all()


def test_forward_is_deterministic_without_sampling_and_seeded_with():
    model = AutoencoderKL(tiny_autoencoder_kl()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        r1, post = model(x, sample_posterior=False)
        r2, _ = model(x, sample_posterior=False)
        s1, _ = model(x, generator=torch.Generator().manual_seed(3))
        s2, _ = model(x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(r1, r2) and torch.equal(s1, s2) and not torch.equal(r1, s1)
        torch.testing.assert_close(r1, model.decode(post.mean))


# ----------------------------------------------------------------------------------------------- errors
def test_size_and_shape_errors_name_the_bad_value():
    kl, vq = AutoencoderKL(tiny_autoencoder_kl()), VQAutoencoder(tiny_vq())
    for model in (kl, vq):
        with pytest.raises(ValueError, match=r"30x32 is not divisible by the downsampling factor 4"):
            model.encode(torch.randn(1, 3, 30, 32))
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 32, 32\)"):
            model.encode(torch.randn(1, 1, 32, 32))
        with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 8, 4, 4\)"):
            model.decode(torch.randn(1, 8, 4, 4))
        with pytest.raises(ValueError, match="tile_size \\(30\\) and overlap \\(8\\) must be multiples of the downsampling factor 4"):
            model.tiled_encode(torch.randn(1, 3, 64, 64), tile_size=30, overlap=8)
        with pytest.raises(ValueError, match="overlap must be in"):
            model.tiled_decode(torch.randn(1, 4, 16, 16), tile_size=32, overlap=32)


# ----------------------------------------------------------------------------------------------- tiling
def test_tiled_apply_blends_exactly_for_local_maps():
    """With a pointwise map tiling is exact; with a 2x upsampling and a 3x3 conv the only error is the conv's
    zero padding at tile borders, which the ramps fade out almost entirely."""
    x = torch.randn(2, 3, 37, 53)
    torch.testing.assert_close(tiled_apply(torch.tanh, x, tile=16, overlap=6, scale=1), torch.tanh(x))
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    up = torch.nn.Upsample(scale_factor=2)
    fn = lambda t: conv(up(t))  # noqa: E731
    with torch.no_grad():
        full, tiled = fn(x), tiled_apply(fn, x, tile=16, overlap=6, scale=2)
    assert tiled.shape == full.shape == (2, 5, 74, 106)
    assert ((tiled - full).norm() / full.norm()).item() < 0.02


def test_tiled_encode_decode_equal_untiled_for_one_tile_and_close_otherwise():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_autoencoder_kl()).eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        post = model.encode(x)
        z = post.mean
        full = model.decode(z)
        assert torch.equal(model.tiled_encode(x, tile_size=128, overlap=32).mean, z)
        assert torch.equal(model.tiled_decode(z, tile_size=256, overlap=32), full)
        enc = model.tiled_encode(x, tile_size=96, overlap=32)
        dec = model.tiled_decode(z, tile_size=96, overlap=32)
    assert enc.mean.shape == z.shape and dec.shape == full.shape
    # Random weights, GroupNorm over a tile instead of the image: close, not equal (measured ~0.06 / ~0.2).
    assert ((enc.mean - z).norm() / z.norm()).item() < 0.15
    assert ((dec - full).norm() / full.norm()).item() < 0.4


# ----------------------------------------------------------------------------------------------- overfitting
def overfit(model: AutoencoderKL | VQAutoencoder, images: torch.Tensor, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """Train on ``images`` alone; return the reconstruction MSE (eval mode, posterior mean) before and after."""

    def mse() -> float:
        model.eval()
        with torch.no_grad():
            recon = model(images, sample_posterior=False)[0] if isinstance(model, AutoencoderKL) else model(images)[0]
        model.train()
        return (recon - images).pow(2).mean().item()

    before = mse()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        recon, aux = model(images, generator=g)
        rec = (recon - images).pow(2).mean()
        loss = rec + 1e-6 * aux.kl().mean() if isinstance(aux, DiagonalGaussian) else rec + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return before, mse()


@pytest.fixture(scope="module")
def overfit_kl() -> tuple[AutoencoderKL, float, float]:
    threads = torch.get_num_threads()  # module-scoped, so set up before the per-test one_thread fixture
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_autoencoder_kl(**OVERFIT))
    before, after = overfit(model, patterns(), steps=200)
    torch.set_num_threads(threads)
    return model, before, after


def test_kl_autoencoder_overfits_a_handful_of_images(overfit_kl):
    _, before, after = overfit_kl  # measured: 0.80 -> 0.012 (68x)
    assert after < before / 5, (before, after)


def test_vq_autoencoder_with_ema_and_restarts_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = VQAutoencoder(tiny_vq(**OVERFIT, num_embeddings=64, ema=True, dead_code_threshold=0.5))
    before, after = overfit(model, patterns(), steps=200)  # measured: 0.82 -> 0.010 (82x)
    assert after < before / 5, (before, after)
    _, q = model(patterns())
    assert q.perplexity > 4  # many codes in use, not a collapsed codebook


def test_vq_autoencoder_with_codebook_loss_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = VQAutoencoder(tiny_vq(**OVERFIT, num_embeddings=64))
    before, after = overfit(model, patterns(), steps=200)  # measured: 0.82 -> 0.011 (73x)
    assert after < before / 5, (before, after)


def test_tiled_reconstruction_of_a_trained_model_is_as_good_as_untiled(overfit_kl):
    """On a 64x64 mosaic of four training images the tiled round trip reconstructs as well as the untiled one."""
    model, _, _ = overfit_kl
    x = patterns()
    mosaic = torch.cat([torch.cat([x[0], x[1]], 2), torch.cat([x[2], x[3]], 2)], 1)[None]  # (1, 3, 64, 64)
    with torch.no_grad():
        full = model.decode(model.encode(mosaic).mean)
        tiled = model.tiled_decode(model.tiled_encode(mosaic, tile_size=32, overlap=16).mean, tile_size=32, overlap=16)
    err_full = (full - mosaic).pow(2).mean().item()
    err_tiled = (tiled - mosaic).pow(2).mean().item()
    assert err_tiled < 1.5 * err_full, (err_tiled, err_full)  # measured: 0.047 tiled, 0.053 untiled


def test_latent_mode_takes_the_kl_mode_and_keeps_vq_latents():
    from openldm.models.autoencoder import (
        AutoencoderKL,
        LatentCodec,
        VQAutoencoder,
        latent_mode,
        tiny_autoencoder_kl,
        tiny_vq,
    )

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    kl, vq = AutoencoderKL(tiny_autoencoder_kl()).eval(), VQAutoencoder(tiny_vq()).eval()
    with torch.no_grad():
        assert torch.equal(latent_mode(kl.encode(x)), kl.encode(x).mean)
        assert torch.equal(latent_mode(vq.encode(x)), vq.encode(x))  # a tensor: not torch.Tensor.mode's reduction
        assert LatentCodec(vq, 2.0)(x).shape == (2, 4, 4, 4)
