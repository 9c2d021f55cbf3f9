"""Inference schedules: which noise levels a sampler visits, built exactly as the reference (diffusers) builds them
for the scheduler each sampler follows, so one scheduler config means the same schedule here and there.

Timestep spacings (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2), for
T training steps and N inference steps:

- ``leading``:  multiples of ``T // N`` counted from 0, plus ``steps_offset`` (Stable Diffusion v1 uses 1);
- ``trailing``: ``round(T - k T / N) - 1`` counted down from T - 1 (reaches the last training step);
- ``linspace``: N evenly spaced points on [0, T - 1].

The diffusers schedulers differ in the details, and each sampler follows its own:

- DDPM/DDIM: integer timesteps; ``linspace`` rounded; the final level is alpha_bar = 1 (DDIM's
  ``set_alpha_to_one``; ``final_sigma="sigma_min"`` is its ``False``). DDIM steps to ``t - T // N`` whatever its list
  says (see ``sample_ddim``'s ``prev_sigmas``).
- Euler, Euler ancestral, Heun, LMS: float timesteps (``linspace`` not rounded); sigmas interpolated linearly in sigma
  over the training table; Karras sigmas span the spaced sigmas' range, their timesteps interpolated in log sigma.
- DPM-Solver multistep: N + 1 points with the last dropped for ``linspace`` and ``leading`` (``T // (N + 1)``);
  Karras sigmas span the whole training range and their timesteps are rounded (except for the cosine schedule).

The initial noise scale is diffusers' ``init_noise_sigma`` written in sigma space: the VP schedulers (DDPM, DDIM,
DPM-Solver) start from unit noise in x_t, i.e. ``sqrt(1 + sigma_max^2)`` here; the Euler family uses sigma_max for
``linspace``/``trailing`` and ``sqrt(sigma_max^2 + 1)`` for ``leading``.

Computations follow diffusers' NumPy code and dtypes so timesteps are identical and sigmas identical in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from openldm.diffusion.schedules import (
    ScheduleConfig,
    karras_sigmas,
    make_alphas_cumprod,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)

SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")


@dataclass(frozen=True)
class _Convention:
    spacing: str  # "discrete" (DDPM/DDIM) | "euler" (Euler family) | "dpm" (DPM-Solver multistep)
    vp_init: bool  # initial noise is unit variance in the VP space
    finals: tuple[str, ...]  # accepted final_sigma values


_CONVENTIONS = {
    "ddpm": _Convention("discrete", True, ("zero",)),
    "ddim": _Convention("discrete", True, ("zero", "sigma_min")),
    "euler": _Convention("euler", False, ("zero", "sigma_min")),
    "euler_ancestral": _Convention("euler", False, ("zero",)),
    "heun": _Convention("euler", False, ("zero",)),
    "lms": _Convention("euler", False, ("zero",)),  # Euler's construction; LMSDiscreteScheduler ends at 0 only
    "dpm": _Convention("dpm", True, ("zero", "sigma_min")),
}


@dataclass(frozen=True)
class SamplingPlan:
    """What a sampler needs for one run.

    - ``sigmas`` (N+1,) float32: decreasing noise levels in sigma space, the last the final level (0 or sigma_min);
    - ``timesteps`` (N,): the training timestep diffusers feeds the network at each of ``sigmas[:-1]``
      (int64 for DDPM/DDIM/DPM-Solver, float32 for the Euler family). Integer timesteps mean the reference gives the
      network integers: build ``DiscreteDenoiser(..., quantize=True)`` to do the same (it matters only for DPM-Solver
      with Karras sigmas, whose timesteps diffusers rounds; elsewhere sigma -> t already lands on integers);
    - ``init_noise_scale``: multiply unit Gaussian noise by this to start from pure noise (``initial_sample``);
    - ``options``: sampler keywords that make the trajectory the reference's (e.g. DDIM's ``prev_sigmas``); pass them
      to the sampler: ``sampler(denoiser, x, plan.sigmas, **plan.options)``.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_scale: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def initial_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """The starting sample from unit Gaussian ``noise`` (text-to-image)."""
        return noise * self.init_noise_scale

    def noised_input(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` noised to the plan's first level, ``x0 + sigma_0 noise`` (image-to-image; diffusers' ``add_noise``
        at the first remaining timestep, in sigma space)."""
        return x0 + noise * float(self.sigmas[0])

    def from_strength(self, strength: float) -> "SamplingPlan":
        """The tail of the schedule an image-to-image run with ``strength`` in (0, 1] walks, as diffusers' img2img
        pipelines cut it: ``init = min(int(N strength), N)`` steps are kept, the first ``N - init`` dropped. (Heun's
        interleaved diffusers schedule drops ``2 (N - init)`` entries there: the same plain steps.)"""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = self.num_steps
        init = min(int(n * strength), n)
        if init == 0:
            raise ValueError(f"strength {strength} keeps no step of a {n}-step schedule; use strength >= {1 / n:.4g}")
        start = n - init
        options = dict(self.options)
        if "prev_sigmas" in options:
            options["prev_sigmas"] = options["prev_sigmas"][start:]
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:], options=options)


def _spaced_timesteps(kind: str, spacing: str, T: int, N: int, steps_offset: int) -> np.ndarray:
    """The reference's timestep list for one convention kind (see module docstring), as NumPy does it."""
    if kind == "dpm":
        if spacing == "linspace":
            return np.linspace(0, T - 1, N + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = T // (N + 1)
            return (np.arange(0, N + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
        return np.arange(T, 0, -T / N).round().copy().astype(np.int64) - 1
    dtype = np.int64 if kind == "discrete" else np.float32
    if spacing == "linspace":
        if kind == "discrete":
            return np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // N
        return (np.arange(0, N) * ratio).round()[::-1].copy().astype(dtype) + dtype(steps_offset)
    return np.round(np.arange(T, 0, -T / N)).astype(dtype) - dtype(1)


def make_plan(sampler: str, schedule: ScheduleConfig | torch.Tensor, num_steps: int, *, spacing: str = "leading",
              steps_offset: int = 1, karras: bool = False, final_sigma: str = "zero") -> SamplingPlan:
    """The schedule for ``num_steps`` steps of the registered sampler ``sampler`` over a training schedule
    (``schedule``: a ScheduleConfig, or its (T,) alphas_cumprod), matching the diffusers scheduler the sampler follows
    when configured with the same ``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas`` and final level
    (``final_sigmas_type``; DDIM's ``set_alpha_to_one=False`` is ``final_sigma="sigma_min"``).

    Defaults are Stable Diffusion v1's scheduler config ("leading", steps_offset 1). With Karras sigmas and a DPM
    solver the timesteps are rounded unless ``schedule`` is a cosine ScheduleConfig (diffusers' rule; given bare
    alphas_cumprod the kind is unknown and they are rounded)."""
    from openldm.registry import SAMPLERS  # a name table, not a layer: samplers register themselves there

    spec = SAMPLERS.get(sampler)
    conv = _CONVENTIONS[spec.convention]
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {SPACINGS}")
    if final_sigma not in conv.finals:
        raise ValueError(f"final_sigma {final_sigma!r} is not supported by sampler {sampler!r}; "
                         f"choose one of {conv.finals}")
    if karras and not spec.supports_karras:
        raise ValueError(f"sampler {sampler!r} does not support Karras sigmas")
    if isinstance(schedule, ScheduleConfig):
        alphas_cumprod, cosine = make_alphas_cumprod(schedule), schedule.kind == "cosine"
    else:
        alphas_cumprod, cosine = schedule, False
    T = alphas_cumprod.shape[0]
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (the training steps), got {num_steps}")

    table = sigmas_from_alphas_cumprod(alphas_cumprod.float().cpu())  # (T,) float32, increasing
    table_np = table.numpy()
    timesteps = _spaced_timesteps(conv.spacing, spacing, T, num_steps, steps_offset)
    if len(timesteps) == 0 or timesteps.min() < 0 or timesteps.max() > T - 1:
        raise ValueError(f"{spacing!r} spacing with {num_steps} steps and steps_offset {steps_offset} gives timesteps "
                         f"outside [0, {T - 1}] (from {timesteps.max()} down to {timesteps.min()})")
    sigma_last = float(table[0]) if final_sigma == "sigma_min" else 0.0
    options: dict[str, Any] = {}

    if conv.spacing == "discrete":
        sigmas = table_np[timesteps].astype(np.float64)
        if spec.convention == "ddim":  # DDIM lands on t - T // N, which may not be the next listed timestep
            prev_t = timesteps - T // num_steps
            prev = np.where(prev_t >= 0, table_np[np.clip(prev_t, 0, T - 1)], sigma_last).astype(np.float32)
            if not np.array_equal(prev, np.append(sigmas[1:], sigma_last).astype(np.float32)):
                options["prev_sigmas"] = torch.from_numpy(prev)
    else:
        sigmas = table_np[timesteps] if conv.spacing == "dpm" else np.interp(timesteps, np.arange(T), table_np)
        if karras:
            if conv.spacing == "dpm":  # the whole training range
                lo, hi = float(table_np[0]), float(table_np[-1])
            else:  # the range of the spaced sigmas
                lo, hi = float(sigmas[-1]), float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, num_steps).numpy()
            t = sigma_to_t(torch.from_numpy(sigmas), torch.from_numpy(np.log(table_np)).double()).numpy()
            if conv.spacing == "dpm":
                timesteps = (t if cosine else t.round()).astype(np.int64)
            else:
                timesteps = t.astype(np.float32)
    sigmas = torch.from_numpy(np.append(sigmas, sigma_last).astype(np.float32))
    timesteps = torch.from_numpy(np.ascontiguousarray(timesteps))

    if conv.vp_init:  # unit noise in x_t at the first level
        init = float((sigmas[0] ** 2 + 1) ** 0.5)
    else:  # diffusers' init_noise_sigma from the largest sigma, in float32
        s_max = sigmas.max()
        init = float((s_max**2 + 1) ** 0.5) if spacing == "leading" else float(s_max)
    if spec.convention == "dpm":  # diffusers: lower_order_final applies to schedules of fewer than 15 steps
        options["lower_order_final"] = num_steps < 15
    return SamplingPlan(sigmas=sigmas, timesteps=timesteps, init_noise_scale=init, options=options)

__all__ = ["SamplingPlan", "make_plan", "SPACINGS", "FINAL_SIGMAS"]
