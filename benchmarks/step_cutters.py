"""The training-free step cutters of issue 16, each beside the full-cost run: what it saves and what it costs.

Variants: plain; guidance only inside a sigma interval (Kynkaanniemi et al. 2024); DeepCache at intervals 2, 3, 5
(Ma et al. 2023); token merging at ratio 0.5 at the top level and at the two top levels (ToMe for SD, Bolya &
Hoffman 2023); and all three together. Each is an ``openldm.pipelines.common.StepCutters``, the object behind
``openldm generate --guidance-interval / --deepcache / --tome``.

Speed, on Stable Diffusion v1.5's topology with random weights (the checkpoint benchmarks/sd15.py builds, or
``--model`` for any SD weights): ``text_to_image`` with Euler, guidance 7.5, one prompt and a negative prompt, at
``--size`` and ``--steps``. Per image: UNet calls (of them full passes: DeepCache's cheap calls run only the shallow
branch), batch rows through the UNet (guidance doubles the batch; the interval halves it outside), GFLOP of the whole
pipeline counted by ``torch.utils.flop_counter`` (machine-independent; attention included), and seconds (median of
``--repeats``, text encoding and decoding included), with the ratio to plain.

Quality, on the bundled Fashion-MNIST model: ``openldm.pipelines.evaluate`` (the ``class`` task: class accuracy,
FID and KID in the cached classifier's features, ``--num-samples`` images, DDIM ``--eval-steps`` steps, guidance
``--eval-guidance``), beside the real row, with the seconds and UNet calls per image of each run.

    python benchmarks/step_cutters.py                          # 256 px, 20 steps; 1000 samples x 50 DDIM steps
    python benchmarks/step_cutters.py --size 512 --repeats 3   # the issue's size
    python benchmarks/step_cutters.py --size 64 --steps 4 --repeats 1 --num-samples 20 --eval-steps 5  # smoke run
    python benchmarks/step_cutters.py --skip-quality           # speed only (or --skip-speed)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_CACHE, FLOP_FORMULAS, GUIDANCE_INTERVAL, NEGATIVE, PROMPT, build_cache, variants

from openldm.pipelines.common import StepCutters, sampling_plan


class UNetCounter:
    """Counts a UNet's calls (its ``conv_in``: every call, DeepCache's cheap ones too), full passes (its middle block)
    and batch rows, through forward hooks removed by :meth:`close`."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.full = self.rows = 0
        self.handles = [unet.conv_in.register_forward_hook(self._call), unet.mid.register_forward_hook(self._full)]

    def _call(self, module, args, out) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]

    def _full(self, *_) -> None:
        self.full += 1

    def reset(self) -> None:
        self.calls = self.full = self.rows = 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def guided_steps(plan, interval: tuple[float, float] | None) -> str:
    """How many of the plan's steps are guided (all of them without an interval)."""
    sigmas = [float(s) for s in plan.sigmas[:-1]]
    inside = sum(interval[0] <= s <= interval[1] for s in sigmas) if interval else len(sigmas)
    return f"{inside}/{len(sigmas)}"


# ---- speed on SD v1.5 topology ---------------------------------------------------------------------------------

def speed_rows(args: argparse.Namespace, rows: list[tuple[str, StepCutters]]) -> list[dict]:
    from openldm.io.sd import load_sd
    from openldm.pipelines.text_to_image import text_to_image

    model = args.model or build_cache(args.cache)
    sd = load_sd(model, device=args.device, dtype=getattr(torch, args.dtype))
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.eval().requires_grad_(False)
    plan = sampling_plan(sd, "euler", args.steps)
    counter = UNetCounter(sd.unet)

    def generate(cutters: StepCutters) -> None:
        text_to_image(sd, PROMPT, negative_prompt=NEGATIVE, sampler="euler", steps=args.steps, guidance_scale=7.5,
                      seed=0, height=args.size, width=args.size, progress=False, cutters=cutters)

    out = []
    generate(StepCutters())  # warm-up: first-call allocations
    for name, cutters in rows:
        counter.reset()
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as flops:
            generate(cutters)
        calls, full, batch_rows = counter.calls, counter.full, counter.rows
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(cutters)
            seconds.append(time.perf_counter() - start)
        out.append({"variant": name, "guided": guided_steps(plan, cutters.guidance_interval), "calls": calls,
                    "full": full, "rows": batch_rows, "gflop": flops.get_total_flops() / 1e9,
                    "seconds": statistics.median(seconds)})
        print(f"  speed: {name}: {out[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    counter.close()
    return out


def speed_table(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]
    title = (f"SD v1.5 topology (random weights), {args.size}x{args.size}, {args.steps} Euler steps, guidance 7.5, "
             f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}:")
    lines = [title, "", ("| variant | guided steps | UNet calls (full) | UNet batch rows | GFLOP / image | ratio "
             "| s / image | ratio |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['guided']} | {r['calls']} ({r['full']}) | {r['rows']} "
                     f"| {r['gflop']:,.1f} | {r['gflop'] / base['gflop']:.2f} | {r['seconds']:.2f} "
                     f"| {r['seconds'] / base['seconds']:.2f} |")
    return "\n".join(lines)


# ---- quality on the bundled Fashion-MNIST model ----------------------------------------------------------------

def quality_rows(args: argparse.Namespace, rows: list[tuple[str, StepCutters]]) -> tuple[dict, list[dict]]:
    from openldm.bundled import bundled_dir
    from openldm.evaluation.classifier import load_classifier
    from openldm.pipelines.evaluate import EvalSettings, evaluate_model
    from openldm.pipelines.trained import load_run

    model = load_run(bundled_dir())
    classifier = load_classifier(args.classifier, progress=False)
    plan = sampling_plan(model, "ddim", args.eval_steps)
    counter = UNetCounter(model.unet)
    real, out = None, []
    for name, cutters in rows:
        counter.reset()
        settings = EvalSettings(num_samples=args.num_samples, sampler="ddim", steps=args.eval_steps,
                                guidance_scales=[args.eval_guidance], tasks=["class"], seed=args.seed,
                                batch_size=args.batch_size, cutters=cutters)
        report = evaluate_model(model, classifier, settings)
        real = report["rows"][0]
        row = report["rows"][1]
        images = args.num_samples
        out.append({"variant": name, "guided": guided_steps(plan, cutters.guidance_interval),
                    "accuracy": row["accuracy"], "fid": row["fid"], "kid": row["kid"], "seconds": row["seconds"],
                    "calls": counter.calls / math.ceil(images / args.batch_size), "full": counter.full /
                    math.ceil(images / args.batch_size), "rows": counter.rows / images})
        print(f"  quality: {name}: FID {row['fid']:.2f}", file=sys.stderr, flush=True)
    counter.close()
    return real, out


def quality_table(real: dict, rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]
    title = (f"Bundled Fashion-MNIST model, class task, {args.num_samples} samples, {args.eval_steps} DDIM steps, "
             f"guidance {args.eval_guidance:g} (real held-out images: accuracy {real['accuracy']:.1%}, "
             f"FID {real['fid']:.2f}):")
    lines = [title, "",
             ("| variant | guided steps | UNet calls / batch (full) | UNet rows / image | class acc. | FID | FID ratio "
             "| KID | s | s ratio |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['guided']} | {r['calls']:.0f} ({r['full']:.0f}) | {r['rows']:.0f} "
                     f"| {r['accuracy']:.1%} | {r['fid']:.2f} | {r['fid'] / base['fid']:.2f} | {r['kid']:.4f} "
                     f"| {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="SD image height = width in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="SD Euler steps (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed images per SD variant (default 2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SD weights' dtype")
    parser.add_argument("--device", default="cpu", help="torch device of the SD runs (default cpu)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"SD checkpoint cache (default {DEFAULT_CACHE})")
    parser.add_argument("--model", default=None, help="SD weights to time instead of the random SD v1.5 checkpoint")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=GUIDANCE_INTERVAL, metavar=("LO", "HI"),
                        help="sigma interval of the guidance-interval rows (default 0.28 5.42, the paper's SD-XL one)")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="Fashion-MNIST samples per variant (default 1000)")
    parser.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the quality runs (default 50)")
    parser.add_argument("--eval-guidance", type=float, default=2.0,
                        help="guidance scale of the quality runs (default 2, the bundled model's recommended)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per sampling batch of the quality runs")
    parser.add_argument("--classifier", default=None, help="classifier file (default: openldm's cached one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the quality runs")
    parser.add_argument("--skip-speed", action="store_true", help="no SD timing")
    parser.add_argument("--skip-quality", action="store_true", help="no Fashion-MNIST evaluation")
    args = parser.parse_args()
    rows = variants(tuple(args.guidance_interval))
    tables = []
    with torch.no_grad():
        if not args.skip_speed:
            tables.append(speed_table(speed_rows(args, rows), args))
        if not args.skip_quality:
            tables.append(quality_table(*quality_rows(args, rows), args))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
