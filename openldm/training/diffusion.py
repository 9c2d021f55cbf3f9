"""Diffusion training: an explicit loop over (cached) latents or pixels, any composition of conditioners.

The run directory (``out_dir``) and its files are ``openldm.io.run_dir``'s: this loop writes the config, weights,
data facts and training state through it, as inference reads them.

Latents: with ``cache_latents`` (the default) the dataset is encoded once into ``latents/`` (the posterior's mode;
random crops or flips of the data are then drawn once, at caching); with ``cache_latents: false`` every batch is
encoded with the frozen autoencoder as it is drawn, so random augmentations are not frozen into a cache and big
folders need none. Either way the latents are the posterior's mode times the scale factor (the autoencoder's
``scaling_factor``; measured as 1 / std of the latents when it has none).

Fine-tuning Stable Diffusion v1 (``base_model``: a single .safetensors file, a diffusers folder or an openldm SD
folder, read by ``openldm.io.sd.load_sd``): the UNet starts from the checkpoint's UNet (its config, its weights),
the checkpoint's VAE encodes the latents (scale factor from the checkpoint, 0.18215 for SD v1), and a text
condition with backend "external" gets the checkpoint's frozen CLIP text encoder and tokenizer (77 tokens, last
layer: the prompt encoding of ``openldm.pipelines.text_to_image``). The schedule and prediction type must be the
checkpoint's. The run stores only what it trains; ``load_run`` takes the VAE and CLIP from ``base_model`` again.

LoRA (a ``lora`` section, :mod:`openldm.training.lora`): the base model's UNet and conditioner are frozen, adapters
are injected into the layers ``lora.targets`` names, and only they are optimised, averaged by the EMA (which shares
the frozen weights instead of copying them) and saved (``lora.safetensors`` in the kohya layout, plus the raw and
EMA adapters for resuming). ``base_model`` is an SD checkpoint as above or a run directory of ``openldm train``
(its EMA UNet and conditioner weights, its autoencoder and latent scale; the config's schedule, prediction and
conditions must be the run's).

Conditions read their inputs from the batch. Two are derived when the data lacks them: a low-res conditioner's image
is the training image shrunk ``factor`` times (its config; antialiased), and inpainting draws random masks. Both read
pixels, which a latent cache built here carries (as float16, column "pixels") when such a condition is configured.
Under DistributedDataParallel their random draws (noise levels, noise, masks) are made for the whole micro-batch on
every rank and each rank keeps its rows, as the loop's own noise, timesteps and dropout are.

Every file is written atomically. A run resumed from its directory follows the same loss curve as an
uninterrupted one: the data order, noise, timesteps and condition dropout are drawn from explicit generators whose
states are saved with the step.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from openldm.conditioning.compose import (
    ComposedConditioner,
    Resources,
    build_conditioning,
    latent_resources,
)
from openldm.conditioning.text import base_resources
from openldm.config import from_dict, to_dict
from openldm.diffusion.objectives import (
    min_snr_weight,
    offset_noise,
    sample_timesteps,
    target,
)
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, q_sample
from openldm.evaluation.grid import image_grid
from openldm.io.files import atomic_path
from openldm.io.native import load_model
from openldm.io.run_dir import (  # noqa: F401  (DiffusionTrainConfig, upgrade_config, data_facts: re-exported)
    CONDITIONER_FILE,
    DATA_FILE,
    LORA_WEIGHTS_FILE,
    SNAPSHOTS,
    UNET_EMA_FILE,
    UNET_FILE,
    BaseRun,
    DiffusionTrainConfig,
    data_facts,
    is_run_dir,
    load_base_model,
    load_base_run,
    save_lora,
    save_weights,
    step_name,
    upgrade_config,
    write_json,
)
from openldm.registry import PRESETS
from openldm.training.checkpoint import LoopState, begin_run, check_finite, check_grad_norm, load_weights
from openldm.training.common import (
    BatchStream,
    StopFlag,
    TrainingDiverged,
    append_metrics,
    autocast_dtype,
    write_config,
)
from openldm.training.diffusion_data import condition_inputs, prepare_data
from openldm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    any_process,
    barrier,
    init_distributed,
    shutdown,
)
from openldm.training.ema import EMA
from openldm.training.lora import inject_lora, load_lora_state_dict, lora_state_dict
from openldm.training.optim import make_optimizer


class DiffusionModel(nn.Module):
    """The trained parts: a UNet and the conditioner filling its slots (one module so DDP and EMA see both)."""

    def __init__(self, unet: nn.Module, conditioner: ComposedConditioner):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, batch: dict, x_t: torch.Tensor, t: torch.Tensor, drops: dict[str, torch.Tensor],
                generator: torch.Generator, latent_size: tuple[int, int]) -> torch.Tensor:
        """Condition (with the given dropout decisions) and denoise one batch."""
        slots = self.conditioner(batch, generator=generator, latent_size=latent_size, drop=drops)
        return self.unet(x_t, t, **slots.to(x_t.device).as_kwargs())


def build_unet_config(cfg: DiffusionTrainConfig, data_channels: int, conditioner: ComposedConditioner):
    """The preset's UNetConfig with the user's overrides and the channel/slot widths the data and
    conditioning require (for a ``base_model`` run: see :func:`check_base_unet`)."""
    kind, base = PRESETS.get(cfg.unet_preset)()
    if kind != "unet":
        raise ValueError(f"unet_preset {cfg.unet_preset!r} is a {kind} preset, not a UNet")
    dims = conditioner.slot_dims()
    data = {**to_dict(base), **cfg.unet}
    data.update(in_channels=data_channels, out_channels=data_channels, vector_dim=dims.vector_dim,
                context_dim=dims.context_dim, concat_channels=dims.concat_channels)
    return from_dict(type(base), data, where="unet")


def check_base_unet(unet_config, data_channels: int, conditioner: ComposedConditioner) -> None:
    """A base model's UNet must take what the data and conditions give it (its config is not ours to change)."""
    dims = conditioner.slot_dims()
    want = {"in_channels": unet_config.in_channels, "context_dim": unet_config.context_dim,
            "vector_dim": unet_config.vector_dim, "concat_channels": unet_config.concat_channels}
    got = {"in_channels": data_channels, "context_dim": dims.context_dim, "vector_dim": dims.vector_dim,
           "concat_channels": dims.concat_channels}
    if got != want:
        raise ValueError(f"the base model's UNet takes {want}, but the data and conditions give {got}; fine-tune it "
                         "with one text condition of backend 'external' and no context_dim (the checkpoint's CLIP), "
                         "plus an inpaint condition for an inpainting checkpoint")


def build_unet(cfg: DiffusionTrainConfig, data_channels: int, conditioner: ComposedConditioner,
               base_unet: nn.Module | None = None) -> nn.Module:
    """The UNet training starts from: a copy of ``base_unet`` (its config and weights, float32) for a base-model
    run, else a fresh UNet of :func:`build_unet_config`."""
    from openldm.models.unet import UNet

    if base_unet is None:
        return UNet(build_unet_config(cfg, data_channels, conditioner))
    check_base_unet(base_unet.config, data_channels, conditioner)
    unet = UNet(base_unet.config)
    unet.load_state_dict({k: v.float() for k, v in base_unet.state_dict().items()})  # copied: never train in place
    return unet


@torch.no_grad()
def sample_grid(model: DiffusionModel, batch: dict, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                schedule: ScheduleConfig, prediction: str, *, steps: int, guidance_scale: float, seed: int,
                decode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Rows of images (B, C, H, W) in [-1, 1]: the data ``x0`` decoded, DDIM samples with every condition null,
    and (a conditional model) samples guided towards ``batch``'s conditions. The same noise for every row, from
    ``seed``; the model's own train/eval mode is left as it was (EMA copies are in eval mode)."""
    from openldm.diffusion.denoiser import DiscreteDenoiser
    from openldm.diffusion.spacing import make_plan
    from openldm.samplers.ddim import sample_ddim
    from openldm.samplers.guidance import with_guidance

    B, size = x0.shape[0], tuple(x0.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    plan = make_plan("ddim", schedule, steps, spacing="trailing", steps_offset=0)
    denoiser = DiscreteDenoiser(model.unet, alphas_cumprod, prediction, quantize=True)
    null = model.conditioner.null(B, latent_size=size).to(x0.device)

    def run(d, cond):
        return decode(sample_ddim(d, plan.initial_sample(noise), plan.sigmas, cond=cond, **plan.options))

    rows = [decode(x0), run(denoiser, null)]
    if len(model.conditioner.conditioners):
        was = model.conditioner.training
        model.conditioner.eval()
        cond = model.conditioner(batch, generator=generator, latent_size=size).to(x0.device)
        model.conditioner.train(was)
        guided = with_guidance(denoiser, null, guidance_scale, prediction=prediction)
        rows.append(run(guided, cond))
    return [r.float().cpu().clamp(-1, 1) for r in rows]


def _tensorboard(out_dir: Path):
    """A TensorBoard writer under ``out_dir/tensorboard``, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _save_weights(out_dir: Path, model: DiffusionModel | None, ema: EMA, scale: float, lora: bool = False) -> None:
    """The run's weight files (EMA only when ``model`` is None, as in snapshots), through the run directory's owner;
    of a LoRA run only the adapters."""
    if lora:
        save_lora(out_dir, unet_config=ema.shadow.unet.config, ema_lora=lora_state_dict(ema.shadow.unet),
                  lora=None if model is None else lora_state_dict(model.unet))
        return
    save_weights(out_dir, ema_unet=ema.shadow.unet, ema_conditioner=ema.shadow.conditioner.state_dict(),
                 scaling_factor=scale, unet=None if model is None else model.unet,
                 conditioner=None if model is None else model.conditioner.state_dict())


def _load_weights(folder: Path, model: DiffusionModel, ema: EMA | None, lora: bool = False) -> None:
    """A checkpoint's weight files into the model (and its EMA copy); of a LoRA run its adapters."""
    if lora:
        state = load_file(str(folder / LORA_WEIGHTS_FILE))
        where = str(folder / LORA_WEIGHTS_FILE)
        load_lora_state_dict(model.unet, {k: v for k, v in state.items() if not k.startswith("ema.")}, where)
        if ema is not None:
            load_lora_state_dict(ema.shadow.unet, {k[4:]: v for k, v in state.items() if k.startswith("ema.")}, where)
        return
    load_weights(model.unet, load_model(folder / UNET_FILE).state_dict(), folder / UNET_FILE)
    cond = load_file(str(folder / CONDITIONER_FILE))
    load_weights(model.conditioner, {k: v for k, v in cond.items() if not k.startswith("ema.")},
                 folder / CONDITIONER_FILE)
    if ema is not None:
        load_weights(ema.shadow.unet, load_model(folder / UNET_EMA_FILE).state_dict(), folder / UNET_EMA_FILE)
        load_weights(ema.shadow.conditioner, {k[4:]: v for k, v in cond.items() if k.startswith("ema.")},
                     folder / CONDITIONER_FILE)


def _load_base(cfg: DiffusionTrainConfig, device: torch.device):
    """The base model of a fine-tuning or LoRA run: an SD checkpoint, or (LoRA runs) a run directory."""
    if cfg.base_model is None:
        return None
    if is_run_dir(cfg.base_model):
        if cfg.lora is None:
            raise ValueError(f"base_model {cfg.base_model!r} is a run directory: train LoRA adapters on it (a lora "
                             "section), or continue training it with --resume")
        return load_base_run(cfg, cfg.base_model, device=device)
    return load_base_model(cfg, device=device)


def train_diffusion(cfg: DiffusionTrainConfig, *, resume: bool | str = False, progress: bool = True,
                    on_log: Callable[[dict], None] | None = None, resources: Resources | None = None,
                    fail_at_step: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) and return the final metrics. ``resume`` and ``overwrite``: see
    :func:`~openldm.training.checkpoint.begin_run`. ``fail_at_step`` injects a NaN loss into
    the update after that many steps (tests; the error names the logged step, one more).

    Under ``torchrun`` (WORLD_SIZE > 1) every process runs this with the same config: each takes its share of the
    global batch (``batch_size`` is global), gradients are averaged by DistributedDataParallel, the logged loss is
    the mean over all processes, and only rank 0 keeps the EMA and writes files. The result equals one process with
    the same global batch, up to float reduction order. A process group this call joined is left at the end."""
    joined = not dist.is_initialized()
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, resume=resume, overwrite=overwrite, progress=progress, on_log=on_log,
                      resources=resources, fail_at_step=fail_at_step)
    finally:
        if joined:
            shutdown()


def _train(cfg: DiffusionTrainConfig, info: DistInfo, *, resume: bool | str, overwrite: bool, progress: bool,
           on_log: Callable[[dict], None] | None, resources: Resources | None,
           fail_at_step: int | None) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    device = torch.device(cfg.device if not cfg.device.startswith("cuda") or not info.enabled else f"cuda:{info.local_rank}")
    start = begin_run(out_dir, to_dict(cfg), resume=resume, overwrite=overwrite, keep=cfg.keep_checkpoints,
                      main=info.is_main)
    if info.is_main:
        write_config(cfg, out_dir)
    torch.manual_seed(cfg.seed)  # parameter initialisation
    base = _load_base(cfg, device)
    ae = base.vae if base is not None else None
    if cfg.autoencoder is not None:
        # float32 whatever the file holds: the bundled and exported autoencoders are float16 copies
        ae = load_model(cfg.autoencoder, device=device, dtype=torch.float32).eval().requires_grad_(False)
    if base is not None and not isinstance(base, BaseRun):
        resources = base_resources(base, resources)
    # every process encodes its share of a latent cache
    data = prepare_data(cfg, out_dir, ae, scale=base.scaling_factor if isinstance(base, BaseRun) else None)
    dataset, scale = data.dataset, data.scale
    conditioner = build_conditioning(cfg.conditions, latent_resources(resources, ae, scale))
    if isinstance(base, BaseRun):
        load_weights(conditioner, base.conditioner, Path(cfg.base_model) / CONDITIONER_FILE)
    channels = int(data.x0(torch.utils.data.default_collate([dataset[0]]), torch.device("cpu")).shape[1])
    unet = build_unet(cfg, channels, conditioner, base.unet if base is not None else None)
    base = None  # the checkpoint's UNet is copied; its VAE and CLIP live on in `ae` and the conditioner
    model = DiffusionModel(unet, conditioner).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lora = cfg.lora is not None
    if lora:  # the base is frozen; only the adapters (on the UNet's device, float32) train
        model.requires_grad_(False)
        inject_lora(model.unet, cfg.lora)
    # weights are equal on every rank: keep one EMA (of a LoRA run: the adapters; the frozen base is shared)
    ema = EMA(model, decay=cfg.ema_decay, share_frozen=lora) if info.is_main else None
    for c in model.conditioner.conditioners.values():  # (after the EMA copy: sampling draws for its own batch)
        c.set_shard(info.rank, info.world_size)  # per-row draws: the whole micro batch, this rank's rows kept
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg.optim, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    alphas_cumprod = make_alphas_cumprod(cfg.schedule).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # noise, timesteps, dropout: the same stream on every rank
    global_batch = cfg.batch_size
    micro = global_batch // cfg.grad_accum  # samples per accumulation step over all ranks
    if micro % info.world_size:
        raise ValueError(f"batch_size / grad_accum = {micro} must divide evenly over {info.world_size} processes")
    stream = BatchStream(dataset, micro // info.world_size, cfg.seed, cfg.num_workers, info)
    loop = LoopState(stream, {"optimizer": opt}, {"scheduler": sched}, {"gen": gen}, scaler, ema)
    step = 0
    if start.folder is not None:
        _load_weights(start.folder, model, ema, lora)
        step = loop.load_state_dict(start.state, lrs={"scheduler": cfg.optim.lr})
    net: nn.Module = model
    if info.enabled:
        # The forward goes through the wrapper (DiffusionModel.forward conditions and denoises), so the backward
        # all-reduces (averages) every gradient: the mean over the global batch when per-rank batches are equal.
        # find_unused_parameters: a weight left out of one rank's graph in a step (a part some configuration does
        # not use) would otherwise make DDP fail; the cost is one walk of the autograd graph per step.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    forward = torch.compile(net) if cfg.compile else net

    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {global_batch}")
    amp_dtype = autocast_dtype(cfg.precision)

    history: list[dict] = []
    board = _tensorboard(out_dir) if info.is_main else None
    if info.is_main and cfg.sample_every:
        # a fixed batch (the first items) whose conditions every grid shows, so grids compare across steps
        fixed = condition_inputs(torch.utils.data.default_collate([dataset[i] for i in range(min(8, len(dataset)))]),
                                 model.conditioner)

        def decode(z: torch.Tensor) -> torch.Tensor:
            if ae is None:
                return z
            weight = next(ae.parameters())
            return ae.decode((z / scale).to(weight.device, weight.dtype))

    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and info.is_main), desc="train")
    stopper = StopFlag()
    t_last, seen, stopped = time.perf_counter(), 0, False
    with stopper.installed():
        while step < cfg.steps and not stopped:
            model.train()
            total = 0.0
            for micro_step in range(cfg.grad_accum):
                batch = condition_inputs(next(stream), model.conditioner)
                x0 = data.x0(batch, device)
                n = x0.shape[0]
                # Draw for the whole micro batch of every rank, keep this rank's rows: the same randomness as one
                # process with the same global batch (ShardedSampler deals rows r, r + W, ...).
                rows = slice(info.rank, micro, info.world_size)
                t = sample_timesteps(micro, cfg.schedule.num_train_steps, gen)[rows].to(device)
                noise = offset_noise((micro, *x0.shape[1:]), cfg.offset_noise, gen)[rows].to(device)
                drops = {k: v[rows] for k, v in model.conditioner.sample_drops(micro, gen).items()}
                ab = alphas_cumprod[t]
                x_t = q_sample(x0, t, alphas_cumprod, noise)
                # accumulation steps before the last skip DDP's gradient all-reduce; the last one averages the sums
                sync = net.no_sync if info.enabled and micro_step < cfg.grad_accum - 1 else contextlib.nullcontext
                with sync(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = forward(batch, x_t, t, drops, gen, tuple(x0.shape[-2:]))
                err = F.mse_loss(out.float(), target(x0, noise, ab, cfg.prediction), reduction="none")
                per_sample = err.mean(dim=tuple(range(1, err.dim())))  # (B,)
                if cfg.min_snr_gamma is not None:
                    per_sample = per_sample * min_snr_weight(ab, cfg.min_snr_gamma, cfg.prediction)
                loss = per_sample.mean() / cfg.grad_accum
                if fail_at_step is not None and step == fail_at_step:
                    loss = loss * float("nan")
                # the mean over every rank: what is logged, and the same NaN verdict everywhere (a rank raising
                # alone would leave the others waiting in the backward's all-reduce)
                global_loss = all_reduce_mean(loss.detach(), info).item()
                if not math.isfinite(global_loss):
                    raise TrainingDiverged(f"loss is {global_loss} at step {step + 1}; training stopped, the last good "
                                           f"checkpoint in {str(out_dir)!r} is untouched")
                with sync():
                    scaler.scale(loss).backward()
                total += global_loss
                seen += n * info.world_size
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip else math.inf)
            check_grad_norm(grad_norm, step + 1, out_dir, scaler)
            scaler.step(opt)
            scaler.update()
            check_finite(params, step + 1, out_dir)
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = {"step": step, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "images_per_s": seen / max(now - t_last, 1e-9)}
                t_last, seen = now, 0
                history.append(rec)
                bar.set_postfix(loss=f"{total:.4f}", ips=f"{rec['images_per_s']:.0f}")
                if info.is_main:
                    append_metrics(out_dir, rec)
                    if board is not None:
                        for key, value in rec.items():
                            if key != "step":
                                board.add_scalar(f"train/{key}", value, step)
                    if on_log:
                        on_log(rec)
            if info.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                rows = sample_grid(ema.shadow, fixed, data.x0(fixed, device), alphas_cumprod,
                                   cfg.schedule, cfg.prediction, steps=cfg.sample_steps,
                                   guidance_scale=cfg.sample_guidance, seed=cfg.seed + 2, decode=decode)
                grid = image_grid(rows)
                (out_dir / "samples").mkdir(exist_ok=True)
                with atomic_path(out_dir / "samples" / f"{step_name(step)}.png") as tmp:
                    grid.save(tmp, format="PNG")
                if board is not None:
                    board.add_image("samples", np.array(grid.convert("RGB")), step, dataformats="HWC")
            if info.is_main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                _save_weights(out_dir / SNAPSHOTS / step_name(step), None, ema, scale, lora)
            stopped = any_process(stopper.stop, info, device)  # a signal to any rank stops every rank at this step
            if info.is_main and (step % cfg.save_every == 0 or step == cfg.steps or stopped):
                start.checkpoints.save(step, loop.state_dict(step), lambda d: _save_weights(d, model, ema, scale, lora))
    bar.close()
    if board is not None:
        board.close()
    barrier(info)  # nobody leaves before rank 0 has written the last checkpoint
    return {"step": step, "history": history, "stopped": stopped}
