"""DeepCache: reuse the UNet's deep features across sampling steps.

Ma, Fang & Wang 2023 ("DeepCache: Accelerating Diffusion Models for Free", §3.2-3.3, uniform 1:N strategy): the
high-level features a UNet computes change little from one denoising step to the next, while the shallow branch
(the first down blocks and the last up blocks, joined by their skip connections) carries the detail. So every
``interval``-th call runs the whole network and keeps the feature map entering the shallow up branch; the calls in
between run only the stem, the first ``branch`` down blocks and the shallow up branch on the kept feature.

The two passes are the UNet's (``UNet.forward_keep``, ``UNet.forward_shallow``, so that a compiled UNet runs them
compiled); in its flat block lists a cheap call runs ``down[:branch]`` and ``up[-(branch + 1):]``, and the kept
feature is the output of ``up[-(branch + 2)]``. ``branch=1`` is DeepCache's default for Stable Diffusion (its cache
branch 0: the first ResBlock/transformer pair of the top level, and the last two up blocks).

The wrapper holds per-sampling-run state; make one per run (``openldm.pipelines.common.guided_denoiser`` does).
It counts network *calls*, so with a sampler that evaluates twice per step (Heun) the interval is in calls. A call
whose batch or size differs from the kept feature's (guidance switched off outside its interval) runs the whole
network and starts a new interval.
"""
from __future__ import annotations

import torch
from torch import nn

from openldm.models.unet import UNet


class DeepCacheUNet(nn.Module):
    """``unet`` with DeepCache: the same call signature; a full pass every ``interval`` calls, the shallow branch
    (``branch`` down blocks) on the kept deep feature in between. ``interval=1`` is the plain UNet.
    ``full_passes`` / ``calls`` count what ran."""

    def __init__(self, unet: nn.Module, interval: int, branch: int = 1):
        super().__init__()
        if not isinstance(unet, UNet):
            # a ValueError: the CLI reports it as a bad setting in one line
            raise ValueError(  # noqa: TRY004
                f"DeepCache needs openldm's UNet, not {type(unet).__name__}; leave deepcache_interval at 1")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"deepcache interval {interval!r} must be an integer >= 1 (1 = off)")
        if not 1 <= branch <= len(unet.down):
            raise ValueError(f"deepcache branch {branch} must be in 1..{len(unet.down)} (down blocks kept)")
        self.unet = unet
        self.interval = interval
        self.branch = branch
        self.calls = 0
        self.full_passes = 0
        self._deep: torch.Tensor | None = None  # input of the shallow up branch at the last full pass
        self._key: tuple | None = None  # (shape of x) the kept feature belongs to
        self._since_full = 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, **slots: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.interval == 1:
            self.full_passes += 1
            return self.unet(x, timesteps, **slots)
        key = tuple(x.shape)
        if self._deep is None or self._since_full >= self.interval or key != self._key:
            out, self._deep = self.unet.forward_keep(x, timesteps, branch=self.branch, **slots)
            self._key, self._since_full = key, 0
            self.full_passes += 1
        else:
            out = self.unet.forward_shallow(x, timesteps, self._deep, branch=self.branch, **slots)
        self._since_full += 1
        return out  # (B, out_channels, H, W)
