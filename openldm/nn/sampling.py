"""Resolution changes: strided-conv downsampling and nearest-neighbour upsampling followed by a conv."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv.

    ``asymmetric_pad`` pads only right and bottom by one pixel before an unpadded conv (the SD autoencoder's
    convention, kept for checkpoint compatibility); otherwise the conv pads 1 on every side (the UNet's).
    """

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16 and x.device.type not in ("cpu", "cuda"):
            # bf16 nearest is not on every backend; exact either way, since nearest only copies values. CPU and CUDA
            # keep bf16: on a CPU the float32 round trip cost 127 ms against 32 ms at SD's VAE top, (1, 256, 256, 256)
            x = x.float()
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x.to(dtype))
