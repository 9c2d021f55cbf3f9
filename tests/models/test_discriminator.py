"""PatchGAN discriminator (Isola et al. 2017; taming's NLayerDiscriminator) and the GAN loss functions."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from openldm.models.discriminator import (
    DiscriminatorConfig,
    PatchGANDiscriminator,
    d_loss_hinge,
    d_loss_least_squares,
    d_loss_vanilla,
    g_loss_hinge,
    g_loss_least_squares,
    g_loss_vanilla,
    gan_losses,
)
from openldm.registry import MODELS


def test_registered_with_its_config_class():
    assert MODELS.get("patchgan") is PatchGANDiscriminator
    assert PatchGANDiscriminator.config_class is DiscriminatorConfig
    assert isinstance(MODELS.get("patchgan")(DiscriminatorConfig(ndf=8)), PatchGANDiscriminator)


@pytest.mark.parametrize(
    "n_layers, size, out, field", [(1, 64, 30, 16), (2, 64, 14, 34), (3, 64, 6, 70), (3, 256, 30, 70)]
)
def test_output_shape_and_receptive_field_property(n_layers, size, out, field):
    d = PatchGANDiscriminator(DiscriminatorConfig(ndf=8, n_layers=n_layers))
    assert d(torch.randn(2, 3, size, size + 32)).shape == (2, 1, out, out + 32 // 2**n_layers)
    assert d.receptive_field == field


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_receptive_field_measured_by_gradients(n_layers):
    """The input pixels that reach one central logit form a square of the published patch size (16/34/70)."""
    torch.manual_seed(n_layers)
    d = PatchGANDiscriminator(DiscriminatorConfig(ndf=4, n_layers=n_layers)).double().eval()
    x = torch.randn(1, 3, 160, 160, dtype=torch.double, requires_grad=True)
    logits = d(x)  # (1, 1, h, w)
    h, w = logits.shape[-2:]
    logits[0, 0, h // 2, w // 2].backward()
    rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
    cols = (x.grad[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
    assert rows[0] > 0 and rows[-1] < 159  # the field lies inside the image, untouched by padding
    assert int(rows[-1] - rows[0] + 1) == int(cols[-1] - cols[0] + 1) == d.receptive_field


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_every_norm_runs_and_trains_a_step(norm):
    d = PatchGANDiscriminator(DiscriminatorConfig(in_channels=4, ndf=8, n_layers=2, norm=norm))
    logits = d(torch.randn(2, 4, 32, 32))
    assert logits.shape == (2, 1, 6, 6)
    d_loss_hinge(logits, -logits).backward()
    assert all(p.grad is not None for p in d.parameters())


def test_taming_layout_parameter_names_and_count():
    """Same keys and size as taming's NLayerDiscriminator(3, 64, 3), so its checkpoints load as is."""
    d = PatchGANDiscriminator(DiscriminatorConfig())
    params = {k: tuple(v.shape) for k, v in d.named_parameters()}
    assert params == {
        "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,), "main.3.bias": (128,),
        "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
        "main.8.weight": (512, 256, 4, 4), "main.9.weight": (512,), "main.9.bias": (512,),
        "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
    }
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert "main.3.running_mean" in d.state_dict()


def test_initialisation_follows_pix2pix():
    torch.manual_seed(0)
    d = PatchGANDiscriminator(DiscriminatorConfig())
    conv_w = torch.cat([d.main[i].weight.flatten() for i in (0, 2, 5, 8, 11)])
    norm_w = torch.cat([d.main[i].weight for i in (3, 6, 9)])
    norm_b = torch.cat([d.main[i].bias for i in (3, 6, 9)])
    assert abs(conv_w.mean()) < 1e-3 and abs(conv_w.std() - 0.02) < 1e-3
    assert abs(norm_w.mean() - 1) < 3e-3 and abs(norm_w.std() - 0.02) < 3e-3
    assert torch.all(norm_b == 0)
    g = PatchGANDiscriminator(DiscriminatorConfig(ndf=64, norm="group"))
    assert abs(g.main[3].weight.mean() - 1) < 0.01 and torch.all(g.main[3].bias == 0)


def test_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match=r"norm='layer'.*batch, group, instance, none"):
        DiscriminatorConfig(norm="layer")
    with pytest.raises(ValueError, match="n_layers=0"):
        DiscriminatorConfig(n_layers=0)
    with pytest.raises(ValueError, match=r"\(2, 4, 32, 32\).*\(B, 3, H, W\)"):
        PatchGANDiscriminator(DiscriminatorConfig(ndf=8))(torch.randn(2, 4, 32, 32))


def _real(n: int, g: torch.Generator) -> torch.Tensor:
    """Smooth images: bilinear upsampling of 4x4 noise, scaled to std 0.5 per image."""
    x = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return 0.5 * (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)


def _fake(n: int, g: torch.Generator) -> torch.Tensor:
    """White noise with the same per-image mean and std: only the texture differs."""
    return 0.5 * torch.randn(n, 3, 32, 32, generator=g)


@torch.no_grad()
def _logit_gap(d: PatchGANDiscriminator, g: torch.Generator) -> float:
    d.eval()
    gap = d(_real(64, g)).mean() - d(_fake(64, g)).mean()
    d.train()
    return float(gap)


def test_training_separates_real_from_fake(one_thread):
    """A few hundred hinge-loss steps drive the mean logit of real patches well above that of fake ones."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d = PatchGANDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2))
    opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gap_before = _logit_gap(d, torch.Generator().manual_seed(1))
    for _ in range(200):
        logits = d(torch.cat([_real(8, g), _fake(8, g)]))  # one batch: BatchNorm sees both halves
        loss = d_loss_hinge(logits[:8], logits[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gap_after = _logit_gap(d, torch.Generator().manual_seed(1))
    print(f"logit gap real - fake: {gap_before:.3f} before, {gap_after:.3f} after; final loss {loss.item():.4f}")
    assert abs(gap_before) < 0.5
    assert gap_after > 2.0, f"logit gap real - fake after training: {gap_after:.3f}"
    assert loss.item() < 0.1


# Closed forms on fixed logits. r = (2, 0.5, -1), f = (-2, 0, 1.5).
R = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_closed_form():
    # relu(1 - r) = (0, .5, 2), relu(1 + f) = (0, 1, 2.5): 0.5 * (2.5/3 + 3.5/3) = 1
    assert d_loss_hinge(R, FAKE).item() == pytest.approx(1.0)
    assert g_loss_hinge(FAKE).item() == pytest.approx(0.5 / 3)
    assert d_loss_hinge(torch.full((4,), 1.5), torch.full((4,), -1.0)).item() == 0.0  # beyond the margins


def test_vanilla_closed_form():
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-v) for v in R.tolist()) / 3 + sum(softplus(v) for v in FAKE.tolist()) / 3)
    assert d_loss_vanilla(R, FAKE).item() == pytest.approx(expected, rel=1e-6)
    minus_log_sigmoid = [-math.log(1 / (1 + math.exp(-v))) for v in FAKE.tolist()]
    assert g_loss_vanilla(FAKE).item() == pytest.approx(sum(minus_log_sigmoid) / 3)
    assert d_loss_vanilla(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_least_squares_closed_form():
    # (r - 1)^2 = (1, .25, 4) -> 1.75; f^2 = (4, 0, 2.25) -> 6.25/3
    assert d_loss_least_squares(R, FAKE).item() == pytest.approx(0.5 * (1.75 + 6.25 / 3))
    # (f - 1)^2 = (9, 1, .25)
    assert g_loss_least_squares(FAKE).item() == pytest.approx(0.5 * 10.25 / 3)
    assert d_loss_least_squares(torch.ones(5), torch.zeros(5)).item() == 0.0


@pytest.mark.parametrize("name", ["hinge", "vanilla", "least_squares"])
def test_losses_push_logits_the_right_way(name):
    d_loss, g_loss = gan_losses(name)
    real = torch.full((2, 1, 3, 3), 0.5, requires_grad=True)
    fake = torch.full((2, 1, 3, 3), 0.5, requires_grad=True)
    d_loss(real, fake).backward()
    assert torch.all(real.grad < 0) and torch.all(fake.grad > 0)  # descent raises real logits, lowers fake ones
    fake.grad = None
    g_loss(fake).backward()
    assert torch.all(fake.grad < 0)  # the generator raises the logits of its samples


def test_unknown_loss_name():
    with pytest.raises(ValueError, match=r"'wgan'.*hinge, vanilla, least_squares"):
        gan_losses("wgan")
