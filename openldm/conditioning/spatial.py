"""Spatial conditions, all into the ``concat`` slot at the size of the tensor being denoised.

- :class:`SegmentationConditioner` ("segmentation"): a label map or one-hot map, resized, then a learned 1x1
  convolution to a few channels (Rombach et al. 2022, sec. 4.3.2: semantic synthesis by concatenation).
  Null: the all-zero one-hot map through the same convolution (its bias), which no real map produces.
- :class:`LowResConditioner` ("low_res"): super-resolution (Rombach et al. 2022, sec. 4.4; SD x4 upscaler). The
  low-resolution image is upsampled and noised with a sampled level ("noise conditioning augmentation", Saharia
  et al. 2022, "Image Super-Resolution via Iterative Refinement" / Ho et al. 2022, "Cascaded Diffusion Models");
  the level's sinusoidal embedding fills ``vector``. Null: zeros in both, and the zero vector is never the
  embedding of a level (each sin/cos pair has norm 1), so it marks "no image" without an extra flag channel.
  Training derives the low-res image (when the data has none) by shrinking the image ``factor`` times.
- :class:`InpaintConditioner` ("inpaint"): SD-inpainting's ``[mask, masked-image latent]`` channels, with
  :class:`MaskGenerator` drawing random boxes and brush strokes (in the manner of Yu et al. 2019, "Free-Form
  Image Inpainting with Gated Convolution", and Suvorov et al. 2022, LaMa) when the batch has no mask.
  Null: mask all ones ("nothing known") and a zero latent.

Random draws (noise levels and noise, masks) come from the ``generator`` given to ``forward``. Under data
parallelism each process holds rows ``rank, rank + W, ...`` of a batch (``shard``, set by the training loop): it
draws for the whole batch and keeps its own rows, so W processes draw exactly what one process with the whole batch
draws, and the generator advances the same on every rank.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from openldm.conditioning.compose import (
    Batch,
    Conditioner,
    RequestContext,
    RequestField,
    Resources,
    Shared,
    batch_value,
    random_on,
    require_size,
)
from openldm.conditioning.inputs import as_images, batched, fill_mask, label_map
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, q_sample
from openldm.nn.embedding import timestep_embedding
from openldm.nn.slots import Slots
from openldm.registry import CONDITIONERS

RESIZE_MODES = ("area", "nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class RowShard:
    """This process's rows of a batch dealt over ``world_size`` processes as ``ShardedSampler`` deals them (rows
    ``rank``, ``rank + world_size``, ...; every process holds the same number). The default is the whole batch."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RowShard rank={self.rank}, world_size={self.world_size}; need 0 <= rank < world_size")

    def draw(self, local_size: int, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``fn(n)`` draws a tensor for n rows; it is called for the whole batch (``local_size * world_size``
        rows) and this process's rows are kept."""
        if self.world_size == 1:
            return fn(local_size)
        return fn(local_size * self.world_size)[self.rank::self.world_size]


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size``; bilinear and bicubic are antialiased when they shrink."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("area", "nearest"):
        return F.interpolate(x, size=size, mode=mode)
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink)


def _image(batch: Batch, key: str, who: str, channels: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(batch_value(batch, key, who))
    if x.dim() != 4 or not x.is_floating_point() or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else channels
        raise ValueError(f"batch[{key!r}] must be a float image (B, {c}, H, W); got {x.dtype} {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------------ segmentation


@dataclass
class SegmentationConfig:
    """``batch[key]``: integer labels 0..num_classes-1 (B, H, W) or (B, 1, H, W), or a float one-hot/soft map
    (B, num_classes, H, W). ``resize``: "area" keeps each class's fraction per cell; "nearest" keeps it hard."""

    key: str = "mask"
    num_classes: int = 2
    channels: int = 4
    resize: str = "area"

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.channels < 1:
            raise ValueError(f"SegmentationConfig num_classes={self.num_classes}, channels={self.channels}; both must be >= 1")
        if self.resize not in ("area", "nearest"):
            raise ValueError(f"SegmentationConfig.resize={self.resize!r}; choose 'area' or 'nearest'")


@CONDITIONERS.register("segmentation")
class SegmentationConditioner(Conditioner):
    """Mask -> one-hot (B, K, H, W) -> resized to ``latent_size`` -> 1x1 conv -> ``concat`` (B, channels, h, w)."""

    config_class = SegmentationConfig
    eval_task = "mask"

    def __init__(self, config: SegmentationConfig):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(config.num_classes, config.channels, 1)
        self.concat_channels = config.channels

    def one_hot(self, batch: Batch) -> torch.Tensor:
        c = self.config
        m = torch.as_tensor(batch_value(batch, c.key, "segmentation"), device=self.device)
        if not m.is_floating_point():  # a label map
            if m.dim() == 4 and m.shape[1] == 1:
                m = m[:, 0]
            if m.dim() != 3:
                raise ValueError(f"batch[{c.key!r}] label map has shape {tuple(m.shape)}; accepted: (B, H, W) or (B, 1, H, W)")
            m = m.long()
            bad = m[(m < 0) | (m >= c.num_classes)]
            if bad.numel():
                raise ValueError(f"mask label {int(bad[0])} is out of range; accepted: 0..{c.num_classes - 1}")
            return F.one_hot(m, c.num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
        if m.dim() != 4 or m.shape[1] != c.num_classes:
            raise ValueError(
                f"batch[{c.key!r}] float map has shape {tuple(m.shape)}; accepted: one-hot (B, {c.num_classes}, H, W), "
                "or an integer label map (B, H, W)"
            )
        return m.float()

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("mask", "label_map", "segmentation label map (an L/P/I PNG of class ids)"),)

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        if values.get("mask") is None or values.get("init_image") is not None:  # with an image: inpainting's mask
            return None
        return {self.config.key: batched(label_map(values["mask"]), ctx.batch_size, "mask")}

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        size = require_size(latent_size, "segmentation")
        one_hot = resize(self.one_hot(batch), size, self.config.resize)  # (B, K, h, w)
        return Slots(concat=self.conv(one_hot))  # (B, channels, h, w)

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        size = require_size(latent_size, "segmentation")
        zeros = torch.zeros(batch_size, self.config.num_classes, *size, device=self.device)
        return Slots(concat=self.conv(zeros))  # the conv's bias everywhere


# ---------------------------------------------------------------------------------------- super-resolution


def _upscaler_schedule() -> ScheduleConfig:
    # SD x4 upscaler's low_res_scheduler: scaled-linear betas 1e-4 .. 0.02 over 1000 steps
    return ScheduleConfig(kind="scaled_linear", num_train_steps=1000, beta_start=0.0001, beta_end=0.02)


@dataclass
class LowResConfig:
    """``batch[key]``: the low-resolution image (B, channels, h0, w0) in [-1, 1]; training derives it, when the
    data has none, by shrinking the image ``factor`` times (antialiased bicubic). Training draws noise levels
    uniformly from 0..max_noise_level; eval mode uses ``batch[noise_level_key]`` ((B,) or a number) if present,
    else ``sample_noise_level``. Defaults are the SD x4 upscaler's (350 and 20)."""

    key: str = "low_res"
    factor: int = 4
    channels: int = 3
    max_noise_level: int = 350
    sample_noise_level: int = 20
    noise_level_key: str = "noise_level"
    embed_dim: int = 128
    resize: str = "bilinear"
    schedule: ScheduleConfig = field(default_factory=_upscaler_schedule)

    def __post_init__(self) -> None:
        top = self.schedule.num_train_steps - 1
        if not 0 <= self.max_noise_level <= top or not 0 <= self.sample_noise_level <= top:
            raise ValueError(
                f"noise levels max_noise_level={self.max_noise_level}, sample_noise_level={self.sample_noise_level}; "
                f"accepted: 0..{top} (the schedule's steps)"
            )
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"LowResConfig.resize={self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if self.channels < 1 or self.embed_dim < 2 or self.factor < 1:
            raise ValueError(f"LowResConfig channels={self.channels} and factor={self.factor} must be >= 1 and "
                             f"embed_dim={self.embed_dim} >= 2")


@CONDITIONERS.register("low_res")
class LowResConditioner(Conditioner):
    """Low-res image -> upsampled to ``latent_size`` -> q(x_t | x_0) at a noise level t -> ``concat``
    (B, channels, h, w); the level's sinusoidal embedding -> ``vector`` (B, embed_dim)."""

    config_class = LowResConfig
    eval_task = "super_resolution"
    reads_pixels = True

    def __init__(self, config: LowResConfig):
        super().__init__()
        self.config = config
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(config.schedule), persistent=False)
        self.concat_channels = config.channels
        self.vector_dim = config.embed_dim
        self.shard = RowShard()  # this process's rows of the batch (set by the training loop under DDP)

    def noise_levels(self, batch: Batch, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        c = self.config
        if self.training:
            return self.shard.draw(batch_size, lambda n: torch.randint(
                0, c.max_noise_level + 1, (n,), generator=generator, device=random_on(generator, self.device)
            )).to(self.device)
        given = batch.get(c.noise_level_key, c.sample_noise_level)
        levels = torch.as_tensor(given, device=self.device).long().expand(batch_size).clone()
        top = c.schedule.num_train_steps - 1
        bad = levels[(levels < 0) | (levels > top)]
        if bad.numel():
            raise ValueError(f"noise level {int(bad[0])} is out of range; accepted: 0..{top}")
        return levels

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("low_res", "image", "low-resolution image to upscale"),
                RequestField("noise_level", "int", f"noise augmentation level of the low-res image, "
                             f"0..{self.config.max_noise_level}"))

    def set_shard(self, rank: int, world_size: int) -> None:
        self.shard = RowShard(rank, world_size)

    def derive_input(self, batch: dict[str, Any]) -> str | None:
        """The low-res image, when the data has none: the image shrunk ``factor`` times (antialiased bicubic)."""
        if self.config.key not in batch and "image" in batch:
            image, f = batch["image"].float(), self.config.factor  # (B, C, H, W)
            size = (max(1, image.shape[-2] // f), max(1, image.shape[-1] // f))
            batch[self.config.key] = F.interpolate(image, size=size, mode="bicubic", align_corners=False,
                                                   antialias=True).clamp(-1, 1)  # (B, C, H / f, W / f)
        return self.config.key

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        if values.get("low_res") is None:
            return None
        entries = {self.config.key: batched(as_images(values["low_res"], self.config.channels, None, "low_res"),
                                            ctx.batch_size, "low_res")}
        if values.get("noise_level") is not None:
            entries[self.config.noise_level_key] = values["noise_level"]
        return entries

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        size = require_size(latent_size, "low_res")
        x = resize(_image(batch, self.config.key, "low_res", self.config.channels).to(self.device).float(), size,
                   self.config.resize)  # (B, C, h, w)
        levels = self.noise_levels(batch, x.shape[0], generator)  # (B,)
        noise = self.shard.draw(x.shape[0], lambda n: torch.randn(
            (n, *x.shape[1:]), generator=generator, device=random_on(generator, self.device))).to(self.device)
        noisy = q_sample(x, levels, self.alphas_cumprod, noise)  # sqrt(ab) x + sqrt(1 - ab) eps
        return Slots(vector=timestep_embedding(levels, self.config.embed_dim), concat=noisy)

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        size = require_size(latent_size, "low_res")
        return Slots(vector=torch.zeros(batch_size, self.config.embed_dim, device=self.device),
                     concat=torch.zeros(batch_size, self.config.channels, *size, device=self.device))


# ---------------------------------------------------------------------------------------------- inpainting


@dataclass
class MaskGeneratorConfig:
    """Each mask covers between ``min_fraction`` and ``max_fraction`` of the image, with boxes and (with
    probability ``stroke_prob`` per shape) brush strokes: poly-lines of 1..5 segments with round caps."""

    min_fraction: float = 0.1
    max_fraction: float = 0.5
    stroke_prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_fraction <= self.max_fraction <= 1.0:
            raise ValueError(f"mask fractions min={self.min_fraction}, max={self.max_fraction}; need 0 <= min <= max <= 1")
        if not 0.0 <= self.stroke_prob <= 1.0:
            raise ValueError(f"stroke_prob={self.stroke_prob}; it must lie in [0, 1]")


class MaskGenerator:
    """Random inpainting masks from a ``torch.Generator``: (B, 1, H, W) float, 1 = the region to fill."""

    max_shapes = 16

    def __init__(self, config: MaskGeneratorConfig | None = None):
        self.config = config or MaskGeneratorConfig()

    def __call__(self, batch_size: int, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        H, W = size
        lo, hi = math.ceil(self.config.min_fraction * H * W - 1e-9), math.floor(self.config.max_fraction * H * W + 1e-9)
        if lo > hi:
            raise ValueError(f"no pixel count of a {H}x{W} mask lies in [{self.config.min_fraction}, {self.config.max_fraction}]")
        gen_device = random_on(generator, "cpu")
        masks = torch.zeros(batch_size, 1, H, W)
        for i in range(batch_size):
            masks[i, 0] = self._one(H, W, lo, hi, generator, gen_device).float()
        return masks

    def _one(self, H: int, W: int, lo: int, hi: int, g: torch.Generator | None, dev: torch.device) -> torch.Tensor:
        def u(a: float = 0.0, b: float = 1.0) -> float:
            return a + (b - a) * float(torch.rand((), generator=g, device=dev))

        target = math.ceil(u(self.config.min_fraction, self.config.max_fraction) * H * W - 1e-9)
        target = min(max(target, lo), hi)
        mask = torch.zeros(H, W, dtype=torch.bool)
        for _ in range(self.max_shapes):
            if int(mask.count_nonzero()) >= target:
                break
            shape = self._stroke(H, W, u) if u() < self.config.stroke_prob else self._box(H, W, u)
            candidate = mask | shape
            if int(candidate.count_nonzero()) <= hi:  # a shape that would overshoot is skipped
                mask = candidate
        while (count := int(mask.count_nonzero())) < lo:  # top up with boxes that cannot overshoot `hi`
            free = (~mask).flatten().nonzero()[:, 0]
            at = int(free[min(int(u() * free.numel()), free.numel() - 1)])
            side = max(1, math.isqrt(min(hi - count, target - count)))
            top, left = divmod(at, W)
            mask[top: top + side, left: left + side] = True
        return mask

    @staticmethod
    def _box(H: int, W: int, u: Callable[..., float]) -> torch.Tensor:
        h, w = max(1, round(u(0.1, 0.6) * H)), max(1, round(u(0.1, 0.6) * W))
        top, left = int(u() * (H - h + 1)), int(u() * (W - w + 1))
        box = torch.zeros(H, W, dtype=torch.bool)
        box[top: top + h, left: left + w] = True
        return box

    @staticmethod
    def _stroke(H: int, W: int, u: Callable[..., float]) -> torch.Tensor:
        radius = max(0.75, u(0.05, 0.15) * min(H, W) / 2)  # >= 0.75 px: the nearest pixel is always inside
        x0, y0 = u(0, W - 1), u(0, H - 1)
        out = torch.zeros(H, W, dtype=torch.bool)
        for _ in range(1 + int(u() * 5)):
            angle, length = u(0, 2 * math.pi), u(0.1, 0.4) * max(H, W)
            x1 = min(max(x0 + length * math.cos(angle), 0.0), W - 1.0)
            y1 = min(max(y0 + length * math.sin(angle), 0.0), H - 1.0)
            # rasterise the capsule (segment + radius) inside its bounding box only
            top, bottom = max(0, math.floor(min(y0, y1) - radius)), min(H, math.ceil(max(y0, y1) + radius) + 1)
            left, right = max(0, math.floor(min(x0, x1) - radius)), min(W, math.ceil(max(x0, x1) + radius) + 1)
            ys = torch.arange(top, bottom, dtype=torch.float32)[:, None] - y0  # (h, 1)
            xs = torch.arange(left, right, dtype=torch.float32)[None, :] - x0  # (1, w)
            dx, dy = x1 - x0, y1 - y0
            t = ((xs * dx + ys * dy) / max(dx * dx + dy * dy, 1e-12)).clamp(0, 1)  # (h, w) projection on the segment
            out[top:bottom, left:right] |= (xs - t * dx) ** 2 + (ys - t * dy) ** 2 <= radius**2
            x0, y0 = x1, y1
        return out


@dataclass
class InpaintConfig:
    """``batch[image_key]``: (B, C, H, W) in [-1, 1]; ``batch[mask_key]``: (B, 1, H, W) or (B, H, W), 1 (or True)
    = the region to fill; drawn by the mask generator when absent. ``latent_channels``: channels of ``encode``'s
    output (the image's channels when there is no autoencoder); None = the autoencoder's, from the resources."""

    image_key: str = "image"
    mask_key: str = "inpaint_mask"
    latent_channels: int | None = None
    masks: MaskGeneratorConfig = field(default_factory=MaskGeneratorConfig)

    def __post_init__(self) -> None:
        if self.latent_channels is not None and self.latent_channels < 1:
            raise ValueError(f"InpaintConfig.latent_channels={self.latent_channels}; it must be >= 1")


@CONDITIONERS.register("inpaint")
class InpaintConditioner(Conditioner):
    """Image + mask -> ``concat`` (B, 1 + latent_channels, h, w) = [mask at latent size, encode(image * (1 - mask))],
    SD-inpainting's channel order. ``encode`` runs without gradients (a frozen autoencoder); None = identity."""

    config_class = InpaintConfig
    eval_task = "inpaint"
    reads_pixels = True

    def __init__(self, config: InpaintConfig, encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self._encode = Shared(encode)  # never a submodule: the autoencoder is not ours to save, train or copy
        self.mask_generator = MaskGenerator(config.masks)
        if config.latent_channels is None:
            raise ValueError("inpaint: latent_channels is not set and no autoencoder gives it; set options."
                             "latent_channels (the image's channels for a pixel-space model)")
        self.concat_channels = 1 + config.latent_channels
        self.shard = RowShard()  # this process's rows of the batch (set by the training loop under DDP)

    @classmethod
    def build(cls, config: InpaintConfig, resources: Resources | None = None) -> "InpaintConditioner":
        if config.latent_channels is None and resources is not None and resources.latent_channels is not None:
            config = dataclasses.replace(config, latent_channels=resources.latent_channels)
        return cls(config, resources.encode if resources is not None else None)

    def fill_mask(self, batch: Batch, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 1, H, W) bool, True = fill: the batch's mask, or a random one."""
        B, _, H, W = image.shape
        if self.config.mask_key not in batch:
            return self.shard.draw(B, lambda n: self.mask_generator(n, (H, W), generator)).to(image.device) > 0.5
        m = torch.as_tensor(batch[self.config.mask_key], device=image.device)
        m = m[:, None] if m.dim() == 3 else m
        if m.shape != (B, 1, H, W):
            raise ValueError(f"batch[{self.config.mask_key!r}] has shape {tuple(m.shape)}; accepted: ({B}, 1, {H}, {W}) or ({B}, {H}, {W})")
        return m > 0.5 if m.is_floating_point() else m.bool()

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("init_image", "image", "image to inpaint"),
                RequestField("mask", "image", "inpainting mask (white = redraw)"))

    def set_shard(self, rank: int, world_size: int) -> None:
        self.shard = RowShard(rank, world_size)

    def derive_input(self, batch: dict[str, Any]) -> str | None:
        return self.config.image_key  # the image itself (random masks are drawn in forward)

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        if values.get("init_image") is None:
            return None
        if values.get("mask") is None:
            raise ValueError("this model inpaints: give the mask of the region to fill with init_image")
        image = as_images(values["init_image"], ctx.image_channels, ctx.image_size, "init_image")
        return {self.config.image_key: batched(image, ctx.batch_size, "init_image"),
                self.config.mask_key: batched(fill_mask(values["mask"], ctx.image_size), ctx.batch_size, "mask")}

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        image = _image(batch, self.config.image_key, "inpaint").to(self.device)
        fill = self.fill_mask(batch, image, generator)  # (B, 1, H, W)
        masked = image * ~fill  # the known pixels; holes 0 (grey in [-1, 1])
        with torch.no_grad():
            encode = self._encode.value
            latent = (encode(masked) if encode is not None else masked).float()  # (B, C, h, w)
        if latent.shape[1] != self.config.latent_channels:
            raise ValueError(f"the masked image's latent has {latent.shape[1]} channels; latent_channels={self.config.latent_channels}")
        if latent_size is not None and tuple(latent.shape[-2:]) != tuple(latent_size):
            raise ValueError(f"the masked image's latent is {tuple(latent.shape[-2:])}; latent_size={tuple(latent_size)}")
        small = F.interpolate(fill.float(), size=latent.shape[-2:], mode="nearest")  # (B, 1, h, w), as SD/diffusers
        return Slots(concat=torch.cat([small, latent.to(small.device)], dim=1))

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        h, w = require_size(latent_size, "inpaint")
        concat = torch.zeros(batch_size, self.concat_channels, h, w, device=self.device)
        concat[:, 0] = 1.0  # everything to fill, nothing known
        return Slots(concat=concat)
