"""Images per second of a latent-diffusion training step: our UNet beside diffusers' UNet2DConditionModel.

One step is what openldm.training.diffusion does per batch, without data loading and EMA: draw timesteps and noise,
q_sample, forward, eps-MSE, backward, gradient clipping (1.0) and an AdamW step (openldm.training.optim). Both
models are built at the identical configuration (small-unet with a 16-token text context of width 384, the bundled
MiniLM encoder's, so diffusers' cross-attention UNet applies) on one set of random weights (benchmarks/unet.py's
build_pair), 4x16x16 latents, batch 32 by default.

Variants, each its own model + optimiser, timed in rounds that alternate the order (a change in machine load hits
all alike): ours and diffusers in fp32 and bf16 autocast, ours in channels_last, alone and with bf16 autocast.
torch.compile runs in a subprocess under a time limit (``--compile-timeout``), beside an eager fp32 baseline of its
own; its compile time (the first step) is reported separately. The table shows median images/s and ratios against
our fp32 baseline (above 1 = faster) and against diffusers at the same setting.

With ``--recipe CONFIG`` it times a whole training recipe instead: ``openldm train``'s own loop (data, conditioners,
EMA, the run's images/s log) for ``--recipe-steps`` steps per variant, fp32, bf16 autocast, channels_last and both,
in rounds that alternate the order, all in one run directory so that the latent cache is built once. The first
logged interval of every run (warm-up) is left out of the median.

    python benchmarks/train.py                           # small-unet, batch 32, 4x16x16 latents, CPU
    python benchmarks/train.py --recipe configs/fmnist_class_text.yaml   # the bundled model's recipe
    python benchmarks/train.py --batch 64 --no-compile
    python benchmarks/train.py --device cuda --compile-timeout 900
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import markdown_header  # noqa: E402
from unet import build_pair  # noqa: E402  (benchmarks/unet.py: both UNets on one set of random weights)

import openldm.models.presets  # noqa: E402,F401  (registers the presets)
from openldm.diffusion.objectives import sample_timesteps  # noqa: E402
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, q_sample  # noqa: E402
from openldm.registry import PRESETS  # noqa: E402
from openldm.training.optim import OptimConfig, make_optimizer  # noqa: E402


@dataclasses.dataclass
class Variant:
    name: str
    model: str  # ours | diffusers
    autocast: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False


def unet_config(args: argparse.Namespace):
    """The ``--preset`` UNet (a registered UNet preset) with ``--context-dim`` context (default: the preset's)."""
    kind, cfg = PRESETS.get(args.preset)()
    if kind != "unet":
        raise SystemExit(f"--preset {args.preset!r} is a {kind} preset; give a UNet preset")
    return dataclasses.replace(cfg, context_dim=args.context_dim) if args.context_dim else cfg


def make_step(variant: Variant, net: nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    """One training step on a fresh draw of timesteps and noise over fixed clean latents and context."""
    device = torch.device(args.device)
    cfg = unet_config(args)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch, cfg.in_channels, args.latent_size, args.latent_size, generator=g).to(device)
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g).to(device)
    alphas_cumprod = make_alphas_cumprod(ScheduleConfig()).to(device)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt, _ = make_optimizer(params, OptimConfig(), total_steps=1)
    if variant.model == "ours":
        call = lambda x, t: net(x, t, context=context)  # noqa: E731
    else:
        call = lambda x, t: net(x, t, encoder_hidden_states=context).sample  # noqa: E731
    if variant.compile:
        call = torch.compile(call)
    autocast = (torch.autocast(device.type, dtype=variant.autocast) if variant.autocast is not None
                else contextlib.nullcontext())

    def step() -> None:
        t = sample_timesteps(args.batch, 1000, g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = q_sample(x0, t, alphas_cumprod, noise)
        if variant.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = call(x_t, t)
        F.mse_loss(out.float(), noise).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step: Callable[[], None], n: int, device: str) -> float:
    """Seconds for ``n`` steps."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(variants: list[Variant], args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Images/s per timed run for each variant (rounds alternate the order), and the first-step seconds."""
    cfg = unet_config(args)
    steps, first = {}, {}
    for v in variants:
        ours, ref = build_pair(cfg, args.device, torch.float32)
        steps[v.name] = make_step(v, ours if v.model == "ours" else ref, args)
        del ours, ref
        first[v.name] = timed(steps[v.name], 1, args.device)  # compiles when compiling
        for _ in range(args.warmup):
            steps[v.name]()
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            rates[v.name].append(args.batch * args.steps_per_run / timed(steps[v.name], args.steps_per_run, args.device))
    return rates, first


RECIPE_VARIANTS = {"fp32": [], "bf16 autocast": ["precision=bf16"], "channels_last": ["channels_last=true"],
                   "bf16 autocast + channels_last": ["precision=bf16", "channels_last=true"]}


def recipe_rates(args: argparse.Namespace) -> dict[str, list[float]]:
    """Images/s of ``--recipe``'s own training loop per variant: every logged interval after each run's first."""
    import tempfile

    from openldm.config import load
    from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

    rates: dict[str, list[float]] = {name: [] for name in RECIPE_VARIANTS}
    with tempfile.TemporaryDirectory() as out:
        run = [f"device={args.device}", f"steps={args.recipe_steps}", f"log_every={max(1, args.recipe_steps // 4)}",
               "sample_every=0", "snapshot_every=0", "save_every=1000000000", f"out_dir={out}"]
        for r in range(args.repeats):
            names = list(RECIPE_VARIANTS) if r % 2 == 0 else list(RECIPE_VARIANTS)[::-1]
            for name in names:
                cfg = load(DiffusionTrainConfig, args.recipe, [*args.recipe_overrides, *RECIPE_VARIANTS[name], *run])
                history = train_diffusion(cfg, overwrite=True, progress=False)["history"]
                rates[name] += [h["images_per_s"] for h in history[1:]]
                print(f"  {name}: images/s " + " ".join(f"{h['images_per_s']:.1f}" for h in history[1:]), flush=True)
    return rates


def recipe_main(args: argparse.Namespace) -> None:
    print(f"recipe={args.recipe} overrides={args.recipe_overrides} device={args.device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} x "
          f"{args.recipe_steps} steps", flush=True)
    med = {name: statistics.median(r) for name, r in recipe_rates(args).items()}
    header = f"| {'variant':<30} | {'images/s':>9} | {'vs fp32':>8} |"
    print(markdown_header(header))
    for name, value in med.items():
        print(f"| {name:<30} | {value:>9.1f} | {value / med['fp32']:>8.3f} |")
    print("images/s = median over logged intervals (each run's first left out); ratios above 1: faster.")


def compile_worker(args: argparse.Namespace) -> dict:
    variants = [Variant("ours fp32", "ours"), Variant("ours compile", "ours", compile=True)]
    rates, first = measure(variants, args)
    return {"rates": rates, "first": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent height = width (default 16)")
    parser.add_argument("--tokens", type=int, default=16, help="context tokens (default 16)")
    parser.add_argument("--preset", default="small-unet", help="UNet preset (default small-unet; sd15-unet for SD "
                                                                 "v1.5's UNet, e.g. --latent-size 32 for 256 px)")
    parser.add_argument("--context-dim", type=int, default=None,
                        help="context width (default 384, MiniLM's, for small-unet; else the preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (default 5)")
    parser.add_argument("--steps-per-run", type=int, default=2, help="training steps per timed run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile-timeout", type=float, default=600, help="seconds allowed for the compile section")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--recipe", default=None,
                        help="a training config (e.g. configs/fmnist_class_text.yaml): time its own loop instead")
    parser.add_argument("--recipe-steps", type=int, default=40, help="steps per run of --recipe (default 40)")
    parser.add_argument("--recipe-override", dest="recipe_overrides", action="append", default=[],
                        help="a dotted override of --recipe, repeatable (e.g. autoencoder=PATH)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.context_dim is None and args.preset == "small-unet":
        args.context_dim = 384
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(compile_worker(args)))
        return
    if args.recipe:
        recipe_main(args)
        return

    print(f"device={args.device} preset={args.preset} batch={args.batch} latents=4x{args.latent_size}x{args.latent_size} "
          f"context={args.tokens}x{unet_config(args).context_dim} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={args.repeats} x {args.steps_per_run} steps", flush=True)
    variants = [Variant("ours fp32", "ours"), Variant("diffusers fp32", "diffusers"),
                Variant("ours bf16 autocast", "ours", autocast=torch.bfloat16),
                Variant("diffusers bf16 autocast", "diffusers", autocast=torch.bfloat16),
                Variant("ours channels_last", "ours", channels_last=True),
                Variant("ours bf16 + channels_last", "ours", autocast=torch.bfloat16, channels_last=True)]
    rates, first = measure(variants, args)
    for v in variants:
        print(f"  {v.name}: images/s per run " + " ".join(f"{r:.1f}" for r in rates[v.name]), flush=True)
    med = {name: statistics.median(r) for name, r in rates.items()}

    compile_note = "skipped (--no-compile)"
    if not args.no_compile:
        cmd = [sys.executable, __file__, "--worker", *[a for a in sys.argv[1:] if a != "--worker"]]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                compile_note = f"failed (exit code {proc.returncode}): {last[:200]}"
            else:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                eager, comp = (statistics.median(res["rates"][n]) for n in ("ours fp32", "ours compile"))
                print("  (compile process) ours fp32: images/s per run "
                      + " ".join(f"{r:.1f}" for r in res["rates"]["ours fp32"]), flush=True)
                print("  (compile process) ours compile: images/s per run "
                      + " ".join(f"{r:.1f}" for r in res["rates"]["ours compile"]), flush=True)
                med["ours compile"] = comp
                first["ours compile"] = res["first"]["ours compile"]
                # against its own process's eager baseline, then expressed on this process's baseline
                compile_note = (f"compile (first step) {res['first']['ours compile']:.1f} s; compiled / eager in the "
                                f"same process = {comp / eager:.3f}")
                med["ours compile"] = med["ours fp32"] * comp / eager
        except subprocess.TimeoutExpired:
            compile_note = f"not finished within --compile-timeout {args.compile_timeout:.0f} s (killed)"
        print(f"  torch.compile section: {time.perf_counter() - start:.0f} s wall", flush=True)

    base = med["ours fp32"]
    header = f"| {'variant':<26} | {'images/s':>9} | {'vs ours fp32':>12} | {'vs diffusers same setting':>25} |"
    print(markdown_header(header))
    for name, value in med.items():
        ref = {"ours fp32": "diffusers fp32", "ours bf16 autocast": "diffusers bf16 autocast"}.get(name)
        ref_text = f"{value / med[ref]:.3f}" if ref else "-"
        print(f"| {name:<26} | {value:>9.1f} | {value / base:>12.3f} | {ref_text:>25} |")
    print(f"\ntorch.compile: {compile_note}")
    print("images/s = median over runs; ratios above 1: faster. 'ours compile' is scaled from its own process's "
          "eager baseline. Timings on a shared machine are noisy.")


if __name__ == "__main__":
    main()
