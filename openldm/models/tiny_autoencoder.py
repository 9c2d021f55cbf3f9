"""TAESD, the tiny autoencoder distilled into Stable Diffusion's latent space (Ollin Boer Bohan 2023,
github.com/madebyollin/taesd): a plain stack of 3x3 convolutions and ReLU residual blocks, no normalisation and no
attention, about 1.2 M parameters a side against the SD VAE's 34 M (encoder) / 49 M (decoder). It decodes the
diffusion model's latents directly: those are already scaled (``scaling_factor`` 1, where SD's VAE has 0.18215).

The layout follows the published files, so their keys load unchanged: ``encoder`` and ``decoder`` are
``nn.Sequential`` with TAESD's indices (the decoder opens with its parameter-free clamp, ``tanh(z / 3) * 3``).
Images are [-1, 1] outside, [0, 1] inside, as TAESD is trained. A decoder-only file (``taesd_decoder.pth``, the
usual live-preview download) builds a model without an encoder, which decodes and refuses to encode.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from openldm.models.autoencoder import tiled_apply
from openldm.registry import MODELS


@dataclass
class TinyAutoencoderConfig:
    """TAESD for SD v1/v2 and its kin (4 latent channels, factor 8) by default. ``encoder_blocks[i]`` residual
    blocks follow level i's convolution (a strided one after the first); ``decoder_blocks[i]`` precede level i's
    upsampling. ``has_encoder=False``: the decoder alone."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    channels: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    has_encoder: bool = True
    scaling_factor: float = 1.0  # the diffusion model's latents are TAESD's latents
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        if len(self.encoder_blocks) != len(self.decoder_blocks) or not self.encoder_blocks:
            raise ValueError(f"encoder_blocks {self.encoder_blocks} and decoder_blocks {self.decoder_blocks} must "
                             "name the same number of levels (at least one)")
        if min(self.encoder_blocks + self.decoder_blocks) < 0 or min(self.channels, self.z_channels) < 1:
            raise ValueError("block counts must be >= 0 and channel counts >= 1")


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): ``tanh(z / 3) * 3``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class TinyBlock(nn.Module):
    """``relu(conv(relu(conv(relu(conv(x))))) + skip(x))``; ``skip`` is a 1x1 convolution where widths differ."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(c: TinyAutoencoderConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, blocks in enumerate(c.encoder_blocks):
        layers.append(_conv(c.in_channels, c.channels) if i == 0 else _conv(c.channels, c.channels, stride=2,
                                                                             bias=False))
        layers += [TinyBlock(c.channels, c.channels) for _ in range(blocks)]
    layers.append(_conv(c.channels, c.z_channels))
    return nn.Sequential(*layers)


def tiny_decoder(c: TinyAutoencoderConfig) -> nn.Sequential:
    layers: list[nn.Module] = [Clamp(), _conv(c.z_channels, c.channels), nn.ReLU()]
    for i, blocks in enumerate(c.decoder_blocks):
        layers += [TinyBlock(c.channels, c.channels) for _ in range(blocks)]
        last = i == len(c.decoder_blocks) - 1
        if not last:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers.append(_conv(c.channels, c.out_channels) if last else _conv(c.channels, c.channels, bias=False))
    return nn.Sequential(*layers)


@MODELS.register("tiny_autoencoder")
class TinyAutoencoder(nn.Module):
    """Images in [-1, 1] <-> the diffusion model's latents, deterministically (``encode`` returns the latents)."""

    config_class = TinyAutoencoderConfig

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = tiny_encoder(config) if config.has_encoder else None
        self.decoder = tiny_decoder(config)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.decoder_blocks) - 1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("this TAESD has a decoder only (taesd_decoder); image-to-image and inpainting need its "
                             "encoder too: put taesd_encoder beside it, or use a full VAE")
        return self.encoder((x + 1) / 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H / f, W / f)."""
        return self._encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, z_channels, h, w) -> image (B, out_channels, h * f, w * f) in about [-1, 1]."""
        return self.decoder(z) * 2 - 1

    def _tiled(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
               scale: float) -> torch.Tensor:
        f = self.downsampling_factor
        if tile % f or overlap % f or not 0 <= overlap < tile:
            raise ValueError(f"tile_size ({tile}) and overlap ({overlap}) must be multiples of {f}, overlap < tile")
        return tiled_apply(fn, x, tile if scale < 1 else tile // f, overlap if scale < 1 else overlap // f, scale)

    def tiled_encode(self, x: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> torch.Tensor:
        """``encode`` over overlapping ``tile_size`` px tiles, blended."""
        return self._tiled(self._encode, x, tile_size, overlap, 1 / self.downsampling_factor)

    def tiled_decode(self, z: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> torch.Tensor:
        """``decode`` over overlapping tiles; ``tile_size`` and ``overlap`` are in output pixels."""
        return self._tiled(self.decode, z, tile_size, overlap, self.downsampling_factor)
