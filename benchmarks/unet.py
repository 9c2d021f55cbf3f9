"""Forward and training-step time of our UNet beside diffusers' UNet2DConditionModel at identical configurations.

Both models hold the same random weights (converted through openldm.io.keymaps.unet) and run the same inputs.
Runs alternate between the two models so that a change in machine load hits both alike; the table shows
median wall-clock seconds and the ratio ours / diffusers (below 1 = ours faster). On a CPU it also shows the
ratio of process CPU time, which other jobs on a shared machine disturb far less than wall time (with
``--threads 1`` it is the work done; with more threads it also counts OpenMP threads spinning).

    python benchmarks/unet.py                       # small preset at batch 16, then SD v1 at batch 1 on 64x64
    python benchmarks/unet.py --only small --repeats 10 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import torch
from benchlib import markdown_header
from torch.nn import functional as F

from openldm.io.keymaps import unet as keymap
from openldm.models.presets import sd15_unet, small_unet
from openldm.models.unet import UNet, UNetConfig


@dataclasses.dataclass
class Case:
    name: str
    cfg: UNetConfig
    batch: int
    size: int  # latent height = width
    tokens: int  # context length
    repeats: int


def build_pair(cfg: UNetConfig, device: str, dtype: torch.dtype, seed: int = 0):
    """Ours and diffusers' on one set of random weights (built on meta, then assigned: no init, one copy)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**keymap.unet_config_to_diffusers(cfg))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in ours.state_dict().items():
        t = torch.empty(p.shape).uniform_(-1.0, 1.0, generator=g)
        t = t * (3.0 / p.shape[1:].numel()) ** 0.5 if p.dim() > 1 else 0.1 * t + float("norm" in name and name.endswith("weight"))
        state[name] = t.to(device, dtype)
    ours.load_state_dict(state, assign=True)
    ref.load_state_dict(keymap.to_diffusers(state, cfg), assign=True)
    return ours, ref


def inputs(case: Case, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, case.cfg.in_channels, case.size, case.size, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (case.batch,), generator=g).to(device)
    context = torch.randn(case.batch, case.tokens, case.cfg.context_dim, generator=g).to(device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    return x, t, context, target


def timed(fn: Callable[[], None], device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_case(case: Case, device: str, dtype: torch.dtype, warmup: int, channels_last: bool) -> list[tuple]:
    ours, ref = build_pair(case.cfg, device, dtype)
    x, t, context, target = inputs(case, device, dtype)
    if channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    calls = {
        "ours": lambda: ours(x, t, context=context),
        "diffusers": lambda: ref(x, t, encoder_hidden_states=context).sample,
    }
    models = {"ours": ours, "diffusers": ref}

    def forward(name: str) -> Callable[[], None]:
        def fn() -> None:
            models[name].eval()
            with torch.no_grad():
                calls[name]()
        return fn

    def train_step(name: str) -> Callable[[], None]:
        def fn() -> None:  # forward, eps-style MSE, backward; parameter gradients freed afterwards
            models[name].train()
            F.mse_loss(calls[name]().float(), target.float()).backward()
            for p in models[name].parameters():
                p.grad = None
        return fn

    rows = []
    for phase, make in (("forward", forward), ("train step", train_step)):
        wall: dict[str, list[float]] = {"ours": [], "diffusers": []}
        cpu: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for i in range(warmup + case.repeats):
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):  # alternate who goes first
                w, c = timed(make(name), device)
                if i >= warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
        ours_s, ref_s = statistics.median(wall["ours"]), statistics.median(wall["diffusers"])
        cpu_ratio = statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]) if device == "cpu" else None
        rows.append((case.name, phase, ours_s, ref_s, ours_s / ref_s, cpu_ratio))
        runs = "; ".join(f"{n} " + " ".join(f"{w:.3f}" for w in wall[n]) for n in wall)
        print(f"  {case.name} {phase}, wall seconds per run: {runs}", flush=True)
    del ours, ref
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and inputs dtype")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model and phase for the small preset")
    parser.add_argument("--sd-repeats", type=int, default=3, help="timed runs per model and phase for SD v1")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model and phase before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    parser.add_argument("--only", choices=["small", "sd15"], default=None, help="run one case only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    # small-unet with a cross-attention context (diffusers' UNet2DConditionModel needs one), on 32x32 inputs
    small = dataclasses.replace(small_unet(), context_dim=384)
    cases = [
        Case("small-unet (ctx 384) b16 32x32", small, batch=16, size=32, tokens=16, repeats=args.repeats),
        Case("sd15-unet b1 64x64", sd15_unet(), batch=1, size=64, tokens=77, repeats=args.sd_repeats),
    ]
    cases = [c for c in cases if args.only is None or c.name.startswith(args.only)]
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} channels_last={args.channels_last} "
          f"torch={torch.__version__}", flush=True)
    rows = [row for case in cases for row in run_case(case, args.device, dtype, args.warmup, args.channels_last)]

    header = f"| {'case':<32} | {'phase':<10} | {'ours (s)':>9} | {'diffusers (s)':>13} | {'ratio':>6} | {'ratio (CPU time)':>16} |"
    print(markdown_header(header))
    for name, phase, ours_s, ref_s, ratio, cpu_ratio in rows:
        cpu_text = "-" if cpu_ratio is None else f"{cpu_ratio:.3f}"
        print(f"| {name:<32} | {phase:<10} | {ours_s:>9.4f} | {ref_s:>13.4f} | {ratio:>6.3f} | {cpu_text:>16} |")
    print("\nratio = median ours / median diffusers, wall clock (below 1: ours faster); "
          "ratio (CPU time) = the same for process CPU time.")


if __name__ == "__main__":
    main()
