"""PatchGAN discriminator and the GAN losses used to train autoencoders adversarially.

The discriminator is the "NLayerDiscriminator" of pix2pix (Isola et al. 2017, "Image-to-Image Translation with
Conditional Adversarial Networks", sec. 3.2.2) as used by taming-transformers and latent diffusion (Esser et al.
2021, "Taming Transformers for High-Resolution Image Synthesis"; Rombach et al. 2022): a stack of 4x4
convolutions whose output is a map of logits, one per overlapping input patch (70x70 pixels for the default
``n_layers=3``). Its parameter names (``main.N.*``) follow taming's, so their discriminator checkpoints load as is.

The loss functions are plain functions over logits: hinge (Lim & Ye 2017; the latent-diffusion default),
vanilla / non-saturating (Goodfellow et al. 2014) and least squares (Mao et al. 2017, LSGAN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.norm import group_norm
from openldm.registry import MODELS

NORMS = ("batch", "group", "instance", "none")


@dataclass
class DiscriminatorConfig:
    """PatchGAN settings. ``n_layers`` strided convolutions set the patch size (receptive field 16, 34, 70, 142,
    ... pixels for n_layers 1, 2, 3, 4); ``ndf`` is the width of the first layer, doubled per layer up to 8x.
    ``norm``: "batch" (pix2pix / taming), "group" (batch-size independent), "instance" (pix2pix's option,
    no affine), or "none"."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"DiscriminatorConfig.norm={self.norm!r}; choose one of: {', '.join(NORMS)}")
        if self.n_layers < 1:
            raise ValueError(f"DiscriminatorConfig.n_layers={self.n_layers}; must be >= 1")
        if self.ndf < 1 or self.in_channels < 1:
            raise ValueError(f"DiscriminatorConfig ndf={self.ndf}, in_channels={self.in_channels}; both must be >= 1")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return group_norm(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


@MODELS.register("patchgan")
class PatchGANDiscriminator(nn.Module):
    """Fully convolutional discriminator: image (B, C, H, W) -> patch logits (B, 1, H/2^n - 2, W/2^n - 2).

    Layout (taming's ``NLayerDiscriminator``): conv4x4/2 -> LeakyReLU(0.2); then ``n_layers - 1`` times
    conv4x4/2 -> norm -> LeakyReLU; conv4x4/1 -> norm -> LeakyReLU; conv4x4/1 -> 1 channel. Hidden convolutions
    have no bias when the norm that follows has its own shift (batch, group). Initialisation as in pix2pix and
    taming: conv weights ~ N(0, 0.02), norm weights ~ N(1, 0.02) and norm biases 0 (conv biases keep PyTorch's
    default, as taming does).
    """

    config_class = DiscriminatorConfig

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        c = config
        bias = c.norm in ("instance", "none")  # no learned shift in the norm -> the conv keeps its bias
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, c.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < c.n_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, stride=stride, padding=1, bias=bias),
                _norm_layer(c.norm, c.ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(c.ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix / taming initialisation (see the class docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input patch that one output logit sees (70 for n_layers=3)."""
        r = 1 + 3 + 3  # the two stride-1 4x4 convs at the end
        for _ in range(self.config.n_layers):  # each stride-2 4x4 conv: r -> 2r + 2
            r = 2 * r + 2
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"discriminator input has shape {tuple(x.shape)}; expected (B, {self.config.in_channels}, H, W)"
            )
        return self.main(x)  # (B, 1, H/2^n - 2, W/2^n - 2)


# ---------------------------------------------------------------------------------------------------------------
# GAN losses over logits. Discriminator losses take (logits_real, logits_fake), generator losses logits_fake;
# each returns a scalar mean over every logit (every patch of every image).


def d_loss_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017), halved as in taming: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def g_loss_hinge(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()


def d_loss_vanilla(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Cross-entropy GAN (Goodfellow et al. 2014), halved: 0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def g_loss_vanilla(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014): E[softplus(-D(G(z)))] = -E[log sigmoid(D(G(z)))]."""
    return F.softplus(-logits_fake).mean()


def d_loss_least_squares(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """LSGAN (Mao et al. 2017, eq. 9 with a=0, b=1): 0.5 * (E[(D(x) - 1)^2] + E[D(G(z))^2])."""
    return 0.5 * ((logits_real - 1.0).pow(2).mean() + logits_fake.pow(2).mean())


def g_loss_least_squares(logits_fake: torch.Tensor) -> torch.Tensor:
    """LSGAN generator (Mao et al. 2017, eq. 9 with c=1): 0.5 * E[(D(G(z)) - 1)^2]."""
    return 0.5 * (logits_fake - 1.0).pow(2).mean()


DLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits_real, logits_fake) -> scalar
GLoss = Callable[[torch.Tensor], torch.Tensor]  # logits_fake -> scalar

GAN_LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "hinge": (d_loss_hinge, g_loss_hinge),
    "vanilla": (d_loss_vanilla, g_loss_vanilla),
    "least_squares": (d_loss_least_squares, g_loss_least_squares),
}


def gan_losses(name: str) -> tuple[DLoss, GLoss]:
    """(discriminator loss, generator loss) for a config name: "hinge", "vanilla" or "least_squares"."""
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; choose one of: {', '.join(GAN_LOSSES)}")
    return GAN_LOSSES[name]
