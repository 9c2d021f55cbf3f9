"""One bare SD v1.5 UNet call (batch 2, as under guidance) eager and under each torch.compile backend, side by side.

Issue 16 asks for inductor with weight freezing on the CPU and for the OpenVINO backend (PyPI ``openvino``), kept
only if it wins. Each variant runs in its own subprocess (dynamo's caches and the backends' threads do not mix) on
the random-weight SD v1.5 single file that ``sd15.py`` builds, with the same seeded inputs: load with ``load_sd``,
cast, channels_last, compile (its first call, timed apart), then ``--repeats`` timed calls. The table gives the
median call, the ratio to eager in the same run, compile seconds, and the largest difference of the output from the
eager output (the variants must compute the same function).

    python benchmarks/compile_backends.py --size 256 --dtype bfloat16
    pip install openvino && python benchmarks/compile_backends.py --variants eager openvino   # OpenVINO only
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import DEFAULT_CACHE, build_cache  # noqa: E402  (the shared random-weight checkpoint)

VARIANTS = ("eager", "inductor", "inductor-frozen", "openvino")


def worker(variant: str, args: argparse.Namespace) -> dict:
    from openldm.io.sd import load_sd
    from openldm.pipelines.common import compile_modules

    dtype = getattr(torch, args.dtype)
    unet = load_sd(Path(args.cache) / "sd15.safetensors", dtype=dtype).unet.eval()
    unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    side = args.size // 8
    x = torch.randn(2, 4, side, side, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    if variant in ("inductor", "inductor-frozen"):
        compile_modules(unet, freeze=variant == "inductor-frozen")
    elif variant == "openvino":
        try:
            import openvino.torch  # noqa: F401  (registers the "openvino" backend)
        except ImportError:
            return {"error": "openvino is not installed: pip install openvino"}
        unet.compile(backend="openvino", dynamic=False)
    with torch.inference_mode():
        start = time.perf_counter()
        out = unet(x, t, context=context)
        first = time.perf_counter() - start
        calls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            unet(x, t, context=context)
            calls.append(time.perf_counter() - start)
    reference = Path(args.reference)
    if variant == "eager":
        torch.save(out.float(), reference)
        diff = 0.0
    else:
        diff = (out.float() - torch.load(reference)).abs().max().item()
    return {"first_s": first, "call_s": statistics.median(calls), "max_diff": diff,
            "out_scale": out.float().abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=4, help="timed calls after the first (median reported)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="eager runs first in any case: the others are compared with its output")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    build_cache(Path(args.cache))
    variants = ["eager"] + [v for v in args.variants if v != "eager"]
    print(f"SD v1.5 UNet (random weights), batch 2, {args.size}x{args.size} ({args.size // 8}x{args.size // 8} "
          f"latents), {args.dtype}, channels_last, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats} calls\n", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--reference", str(Path(tmp) / "eager.pt"),
                   "--size", str(args.size), "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--cache", args.cache]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                results[variant] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
            else:
                results[variant] = json.loads(lines[-1])
            print(f"  {variant}: {results[variant]}", flush=True)
    eager = results["eager"].get("call_s")
    print(f"\n| {'variant':<16} | {'s / call':>8} | {'/ eager':>7} | {'compile s':>9} | {'max |out - eager|':>17} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 19}|")
    for variant in variants:
        r = results[variant]
        if "error" in r:
            print(f"| {variant:<16} | {'-':>8} | {'-':>7} | {'-':>9} | {r['error']} |")
            continue
        compile_s = "-" if variant == "eager" else f"{r['first_s'] - r['call_s']:.0f}"
        print(f"| {variant:<16} | {r['call_s']:>8.3f} | {r['call_s'] / eager:>7.3f} | {compile_s:>9} | "
              f"{r['max_diff']:>17.4f} |")
    print(f"\n/ eager: below 1 is faster. Output scale (max |eager out|): {results['eager'].get('out_scale', 0):.2f}.")


if __name__ == "__main__":
    main()
