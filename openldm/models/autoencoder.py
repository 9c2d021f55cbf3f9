"""The first-stage autoencoders of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), after the convolutional encoder/decoder of Esser et al. 2021 ("Taming Transformers").

- ``AutoencoderKL``: the encoder predicts a diagonal Gaussian posterior q(z|x) (Kingma & Welling 2014,
  "Auto-Encoding Variational Bayes"), trained with a small KL penalty towards N(0, I). Stable Diffusion's VAE.
- ``VQAutoencoder``: the encoder output is snapped to a learnt codebook (van den Oord et al. 2017, VQ-VAE;
  see openldm.models.quantizer).

Both share one Encoder and one Decoder: conv_in, levels of ResBlocks with a strided-conv downsampling (or
nearest-upsampling) between levels, a mid block (ResBlock, self-attention, ResBlock), GroupNorm, SiLU,
conv_out. Images of any size divisible by the downsampling factor 2 ** (levels - 1) can be encoded;
``tiled_encode`` / ``tiled_decode`` process large images in overlapping, blended tiles.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from openldm.models.quantizer import Quantized, VectorQuantizer
from openldm.nn.attention import SpatialSelfAttention
from openldm.nn.norm import group_norm
from openldm.nn.resblock import ResBlock
from openldm.nn.sampling import Downsample, Upsample
from openldm.registry import MODELS

NORM_EPS = 1e-6  # GroupNorm epsilon throughout the SD autoencoder


# ----------------------------------------------------------------------------------------------- configs
@dataclass
class AutoencoderKLConfig:
    """KL autoencoder. The defaults are Stable Diffusion v1/v2's VAE (83,653,863 parameters, factor 8).

    The encoder always predicts ``2 * z_channels`` maps (mean and log-variance: CompVis's ``double_z``).
    ``scaling_factor`` and ``shift_factor`` map posterior samples to the diffusion model's latent space,
    ``(z - shift_factor) * scaling_factor``; SD's factor 0.18215 gives those latents roughly unit variance.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)


@dataclass
class VQModelConfig:
    """VQ autoencoder: encoder -> 1x1 conv to ``embed_dim`` -> quantiser -> 1x1 conv -> decoder.

    ``beta`` weighs the commitment loss (0.25 in van den Oord et al. 2017). With ``ema`` the codebook follows
    moving averages (``ema_decay``) instead of a codebook loss; ``dead_code_threshold`` > 0 restarts codes
    that receive fewer than that many vectors per batch on average.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 3
    embed_dim: int = 3
    num_embeddings: int = 8192
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.0
    dropout: float = 0.0
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: AutoencoderKLConfig | VQModelConfig) -> None:
    cfg.channel_mult = tuple(cfg.channel_mult)  # YAML gives lists
    if not cfg.channel_mult or any(int(m) != m or m < 1 for m in cfg.channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, got {cfg.channel_mult!r}")
    for name in ("in_channels", "out_channels", "channels", "num_res_blocks", "z_channels"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")


# ----------------------------------------------------------------------------------------------- presets
def sd_autoencoder_kl(**overrides) -> AutoencoderKLConfig:
    """Stable Diffusion v1/v2 VAE ("kl-f8"): 512 px -> 4 x 64 x 64, 83,653,863 parameters."""
    return dataclasses.replace(AutoencoderKLConfig(), **overrides)


def small_autoencoder_kl(**overrides) -> AutoencoderKLConfig:
    """KL-f4 for 32-64 px images (64 px -> 4 x 16 x 16)."""
    cfg = AutoencoderKLConfig(channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, z_channels=4, scaling_factor=1.0)
    return dataclasses.replace(cfg, **overrides)


def tiny_autoencoder_kl(**overrides) -> AutoencoderKLConfig:
    """KL-f4 for 28-32 px images and fast tests (32 px -> 4 x 8 x 8)."""
    cfg = AutoencoderKLConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, scaling_factor=1.0)
    return dataclasses.replace(cfg, **overrides)


def ldm_vq_f4(**overrides) -> VQModelConfig:
    """The latent-diffusion "vq-f4" first stage: factor 4, 3 latent channels, 8192 codes."""
    return dataclasses.replace(VQModelConfig(), **overrides)


def small_vq(**overrides) -> VQModelConfig:
    """VQ-f4 for 32-64 px images, 1024 codes of dimension 4, EMA codebook with dead-code restarts."""
    cfg = VQModelConfig(channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                        num_embeddings=1024, ema=True, dead_code_threshold=1.0)
    return dataclasses.replace(cfg, **overrides)


def tiny_vq(**overrides) -> VQModelConfig:
    """VQ-f4 for 28-32 px images and fast tests, 256 codes of dimension 4."""
    cfg = VQModelConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, num_embeddings=256)
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------------------------- posterior
def latent_mode(encoded) -> torch.Tensor:
    """The deterministic latents of ``autoencoder.encode(x)``: a KL posterior's mode, or a VQ autoencoder's
    pre-quantisation latents (a tensor already; note ``torch.Tensor.mode`` is an unrelated reduction)."""
    return encoded if isinstance(encoded, torch.Tensor) else encoded.mode()


def latent_channels(autoencoder: nn.Module) -> int:
    """Channels of the latents the decoder takes (KL: z_channels, VQ: embed_dim): ``post_quant_conv``'s input."""
    return int(autoencoder.post_quant_conv.in_channels)


class LatentCodec:
    """The one owner of "images <-> diffusion latents": ``latents = scaling_factor * (z - shift)`` with ``z`` the
    autoencoder's latents of the image, and back. ``scaling_factor`` is the autoencoder config's (0.18215 for SD v1)
    or the one a run trained here measured (1 / std of its latents); ``shift`` is the autoencoder config's
    ``shift_factor`` (0 unless the checkpoint says otherwise).

    ``encode(images)`` takes the posterior's mode (what training caches); ``encode(images, generator)`` samples
    the posterior with noise drawn float32 on the CPU from ``generator``, as diffusers' ``latent_dist.sample``.
    Calling the codec is ``encode`` (mode): it is what conditioners that encode images take
    (``Resources.encode``)."""

    def __init__(self, autoencoder: nn.Module, scaling_factor: float):
        self.autoencoder, self.scaling_factor = autoencoder, float(scaling_factor)
        self.shift = float(getattr(autoencoder.config, "shift_factor", 0.0) or 0.0)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.autoencoder.parameters())
        return weight.device, weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
               tile_size: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w), float32 on the autoencoder's device.
        ``tile_size``: encode in overlapping tiles of that many pixels (KL autoencoders)."""
        device, dtype = self._device_dtype()
        x = images.to(device, dtype)
        if tile_size is not None and max(x.shape[-2:]) > tile_size:
            encoded = self.autoencoder.tiled_encode(x, tile_size=tile_size, overlap=tile_size // 8)
        else:
            encoded = self.autoencoder.encode(x)
        if generator is None or isinstance(encoded, torch.Tensor):  # deterministic encoders draw nothing
            z = latent_mode(encoded)  # KL posterior's mode, or VQ's / TAESD's latents
        else:
            eps = torch.randn(tuple(encoded.mean.shape), generator=generator, dtype=torch.float32)
            z = encoded.mean + encoded.std * eps.to(device, encoded.mean.dtype)
        return (z.float() - self.shift) * self.scaling_factor

    __call__ = encode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None) -> torch.Tensor:
        """Latents -> images (B, C, H, W) in [-1, 1] (not clamped), float32 on the CPU."""
        device, dtype = self._device_dtype()
        z = (latents.to(device, torch.float32) / self.scaling_factor + self.shift).to(dtype)
        f = int(self.autoencoder.downsampling_factor)
        if tile_size is not None and max(z.shape[-2:]) * f > tile_size:
            images = self.autoencoder.tiled_decode(z, tile_size=tile_size, overlap=tile_size // 8)
        else:
            images = self.autoencoder.decode(z)
        return images.float().cpu()


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), built from the encoder's (B, 2C, h, w) output (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in CompVis, keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterised). The noise is drawn on the generator's device, so a seed
        gives the same z on every machine."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other), summed over C, h, w: (B,). ``other=None`` means the prior N(0, I)."""
        if other is None:
            kl = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.sum(dim=(1, 2, 3))

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """Negative log-density of ``z`` under this Gaussian, summed over C, h, w: (B,)."""
        nll = math.log(2.0 * math.pi) + self.logvar + (z - self.mean).pow(2) / self.var
        return 0.5 * nll.sum(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------- networks
class Level(nn.Module):
    """ResBlocks at one resolution, then a resolution change (Identity at the last level)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


class MidBlock(nn.Module):
    """ResBlock -> self-attention over all positions -> ResBlock, at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.res_1 = ResBlock(channels, channels, dropout=dropout, eps=NORM_EPS)
        self.attn = SpatialSelfAttention(channels, eps=NORM_EPS)
        self.res_2 = ResBlock(channels, channels, dropout=dropout, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_2(self.attn(self.res_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H / f, W / f), f = 2 ** (len(channel_mult) - 1)."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = channels
        for i, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, channels * mult, dropout=dropout, eps=NORM_EPS))
                ch = channels * mult
            last = i == len(channel_mult) - 1
            self.down.append(Level(blocks, nn.Identity() if last else Downsample(ch, asymmetric_pad=True)))
        self.mid = MidBlock(ch, dropout)
        self.norm_out = group_norm(ch, NORM_EPS)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch * mult, H / 2^i, W / 2^i)
        h = self.mid(h)  # (B, ch * mult[-1], H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H / f, W / f)


class Decoder(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h * f, w * f). ``up[0]`` is the lowest resolution (the
    order of computation; CompVis numbers these levels the other way round)."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, dropout: float = 0.0):
        super().__init__()
        ch = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, dropout)
        self.up = nn.ModuleList()
        for i, mult in enumerate(reversed(channel_mult)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, channels * mult, dropout=dropout, eps=NORM_EPS))
                ch = channels * mult
            last = i == len(channel_mult) - 1
            self.up.append(Level(blocks, nn.Identity() if last else Upsample(ch)))
        self.norm_out = group_norm(ch, NORM_EPS)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * mult[-1], h, w)
        for level in self.up:
            h = level(h)  # resolution doubles after every level but the last
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h * f, w * f)


# ----------------------------------------------------------------------------------------------- tiling
def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(n: int, fade: int, device: torch.device) -> torch.Tensor:
    """(n,) weights rising linearly over ``fade`` samples at both ends, 1 in between, never 0."""
    pos = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    if fade <= 0:
        return torch.ones(n, device=device)
    return torch.minimum(torch.ones_like(pos), torch.minimum(pos, n - pos) / fade)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` windows of x (B, C, H, W) and blend the results.

    ``fn`` maps a (B, C, t, t') window to (B, C', t * scale, t' * scale). Each output tile is weighted by a
    linear ramp across the overlap and the weighted sum is normalised, so seams fade from one tile into the
    next; where only one tile covers a pixel its output is taken unchanged. Windows start at multiples of
    ``tile - overlap`` (the last one is aligned to the border); callers keep all of these integer multiples of
    the resampling factor.
    """
    B, _, H, W = x.shape
    if H <= tile and W <= tile:
        return fn(x)
    stride = tile - overlap
    out = weight = None
    fade = round(overlap * scale)
    for top in _tile_starts(H, tile, stride):
        for left in _tile_starts(W, tile, stride):
            y = fn(x[:, :, top:top + tile, left:left + tile])  # (B, C', th, tw)
            th, tw = y.shape[-2:]
            if out is None:
                out = y.new_zeros(B, y.shape[1], round(H * scale), round(W * scale), dtype=torch.float32)
                weight = y.new_zeros(1, 1, out.shape[2], out.shape[3], dtype=torch.float32)
            w = _ramp(th, fade, y.device)[:, None] * _ramp(tw, fade, y.device)[None, :]  # (th, tw)
            t, l = round(top * scale), round(left * scale)
            out[:, :, t:t + th, l:l + tw] += y.float() * w
            weight[:, :, t:t + th, l:l + tw] += w
    return (out / weight).to(x.dtype)


# ----------------------------------------------------------------------------------------------- autoencoders
class _Autoencoder(nn.Module):
    """What the KL and VQ autoencoders share: size checks and tiling."""

    config: AutoencoderKLConfig | VQModelConfig
    encoder: Encoder
    decoder: Decoder

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def _check_image(self, x: torch.Tensor) -> None:
        f, c = self.downsampling_factor, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor {f}; "
                             f"pad or crop to a multiple of {f}")

    def _check_latent(self, z: torch.Tensor, channels: int) -> None:
        if z.dim() != 4 or z.shape[1] != channels:
            raise ValueError(f"expected latents of shape (B, {channels}, h, w), got {tuple(z.shape)}")

    def _check_tiles(self, tile_size: int, overlap: int) -> None:
        f = self.downsampling_factor
        if tile_size % f or overlap % f or tile_size < 2 * f:
            raise ValueError(f"tile_size ({tile_size}) and overlap ({overlap}) must be multiples of the downsampling "
                             f"factor {f}, with tile_size >= {2 * f}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")

    def _tiled_decode(self, decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile_size: int, overlap: int) -> torch.Tensor:
        self._check_tiles(tile_size, overlap)
        f = self.downsampling_factor
        return tiled_apply(decode, z, tile_size // f, overlap // f, scale=f)


@MODELS.register("autoencoder_kl")
class AutoencoderKL(_Autoencoder):
    """Image <-> diagonal-Gaussian latents (Rombach et al. 2022, sec. 3.1 and appendix G)."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, 2 * c.z_channels, c.channels, c.channel_mult, c.num_res_blocks, c.dropout)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.decoder = Decoder(c.z_channels, c.out_channels, c.channels, c.channel_mult, c.num_res_blocks, c.dropout)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2 * z_channels, H / f, W / f)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W) in [-1, 1] -> posterior over (B, z_channels, H / f, W / f)."""
        self._check_image(x)
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_channels, h, w) -> image (B, out_channels, h * f, w * f)."""
        self._check_latent(z, self.config.z_channels)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def tiled_encode(self, x: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> DiagonalGaussian:
        """``encode`` over overlapping ``tile_size`` px tiles whose moments are blended. GroupNorm and attention
        see one tile at a time, so the result is close to, not equal to, ``encode`` (equal for one tile)."""
        self._check_image(x)
        self._check_tiles(tile_size, overlap)
        return DiagonalGaussian(tiled_apply(self._moments, x, tile_size, overlap, scale=1 / self.downsampling_factor))

    def tiled_decode(self, z: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> torch.Tensor:
        """``decode`` over overlapping tiles; ``tile_size`` and ``overlap`` are in output pixels."""
        self._check_latent(z, self.config.z_channels)
        return self._tiled_decode(lambda t: self.decoder(self.post_quant_conv(t)), z, tile_size, overlap)


@MODELS.register("vq_autoencoder")
class VQAutoencoder(_Autoencoder):
    """Image <-> codebook latents (van den Oord et al. 2017; the convolutional VQGAN generator of Esser et al. 2021).

    As in latent diffusion, ``encode`` returns the continuous latents before quantisation (the space a
    diffusion model works in) and ``decode`` quantises them first; ``quantize`` exposes the loss terms.
    """

    config_class = VQModelConfig

    def __init__(self, config: VQModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.z_channels, c.channels, c.channel_mult, c.num_res_blocks, c.dropout)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.quantizer = VectorQuantizer(c.num_embeddings, c.embed_dim, beta=c.beta, ema=c.ema, decay=c.ema_decay,
                                         dead_code_threshold=c.dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.decoder = Decoder(c.z_channels, c.out_channels, c.channels, c.channel_mult, c.num_res_blocks, c.dropout)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, embed_dim, H / f, W / f)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) -> unquantised latents (B, embed_dim, H / f, W / f)."""
        self._check_image(x)
        return self._latents(x)

    def quantize(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """Snap (B, embed_dim, h, w) latents to the codebook; in training mode this also updates EMA
        statistics and restarts dead codes (``generator`` picks their replacements)."""
        self._check_latent(z, self.config.embed_dim)
        return self.quantizer(z, generator)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> image (B, out_channels, h * f, w * f), quantising them first unless
        ``quantize=False`` (pass ``Quantized.z_q`` that way)."""
        self._check_latent(z, self.config.embed_dim)
        if quantize:
            z = self.quantizer.lookup(self.quantizer.nearest(z)).to(z.dtype)
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> image."""
        return self.decode(self.quantizer.lookup(indices), quantize=False)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Quantized]:
        quantized = self.quantize(self.encode(x), generator)
        return self.decode(quantized.z_q, quantize=False), quantized

    def tiled_encode(self, x: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> torch.Tensor:
        """``encode`` over overlapping ``tile_size`` px tiles, blended (close to, not equal to, ``encode``)."""
        self._check_image(x)
        self._check_tiles(tile_size, overlap)
        return tiled_apply(self._latents, x, tile_size, overlap, scale=1 / self.downsampling_factor)

    def tiled_decode(self, z: torch.Tensor, tile_size: int = 512, overlap: int = 64, quantize: bool = True) -> torch.Tensor:
        """``decode`` over overlapping tiles (quantisation is per position, so it is done once, untiled)."""
        self._check_latent(z, self.config.embed_dim)
        if quantize:
            z = self.quantizer.lookup(self.quantizer.nearest(z)).to(z.dtype)
        return self._tiled_decode(lambda t: self.decoder(self.post_quant_conv(t)), z, tile_size, overlap)
