"""Load time, peak memory and seconds per image for the full SD v1.5 topology: ours beside diffusers.

A random-weight StableDiffusionPipeline with SD v1.5's configurations (UNet 859,520,964 parameters, KL VAE, CLIP
ViT-L/14 text encoder) is built from code once -- no download -- saved as a diffusers folder, and converted by our
converter to an original-layout single file, both in a cache folder. Each side then runs in its own subprocess (so
peak memories do not mix) from the same single file: ours ``load_sd`` + ``text_to_image``, diffusers
``StableDiffusionPipeline.from_single_file`` + ``__call__``, both with Euler, guidance 7.5, one prompt and a
negative prompt. Subprocesses alternate ours / diffusers so that a change in machine load hits both alike; the table
shows medians and the ratio ours / diffusers (below 1 = ours better). "peak RSS" is the process's resident-memory
high-water mark (after loading, and after generating). "per step" is the median time between sampler steps (both
guided UNet calls), "decode" the time from the last step to the images (VAE decode + conversion to PIL).

    python benchmarks/sd15.py                                  # 512x512, 4 steps, float32 and bfloat16, CPU
    python benchmarks/sd15.py --size 256 --steps 2 --repeats 2 --dtype float32
    python benchmarks/sd15.py --gpu                            # + UNet iterations/s at 512x512, batch 2, bf16 (CUDA)
    python benchmarks/sd15.py --size 256 --dtype bfloat16 --compile   # + ours with torch.compile (openldm --compile)
    python benchmarks/sd15.py --steps 20 --dtype bfloat16 --cutters   # + ours with the step cutters on
    python benchmarks/sd15.py --steps 20 --dtype bfloat16 --cutters --taesd   # + cutters with TAESD decoding
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CUTTER_ROW,
    DEFAULT_CACHE,
    FLOP_FORMULAS,
    NEGATIVE,
    PROMPT,
    build_cache,
    markdown_header,
    variants,
)

# ours first, diffusers last (the reference of every ratio); --compile and --cutters add the middle ones
SIDES = ("ours", "ours-compiled", "ours-cutters", "ours-compiled-cutters", "ours-cutters-taesd", "diffusers")


# ---- one side in its own process -------------------------------------------------------------------------------

def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(side: str, args: argparse.Namespace) -> dict:
    """Load, then generate ``warmup + repeats`` images; timings and peak RSS as a dict."""
    dtype = getattr(torch, args.dtype)
    single, folder = Path(args.cache) / "sd15.safetensors", Path(args.cache) / "diffusers"
    stamps: list[float] = []
    start = time.perf_counter()
    if side.startswith("ours"):
        from openldm.io.sd import load_sd
        from openldm.pipelines.common import compile_networks
        from openldm.pipelines.text_to_image import text_to_image

        sd = load_sd(single, device=args.device, dtype=dtype)
        if "taesd" in side:  # TAESD in place of the VAE: the decode a swapped-in --vae taesd gives
            import dataclasses

            from openldm.io.vae import load_vae

            sd = dataclasses.replace(sd, vae=load_vae(taesd_folder(args.cache), device=args.device, dtype=dtype))
        if "compiled" in side:  # as --compile (no LoRAs): graphs compile during the warm-up image (compile_s)
            compile_networks(sd.unet, sd.vae.decoder, freeze=True)
        cutters = None
        if "cutters" in side:  # a row of step_cutters.py (default: the three cutters together)
            cutters = dict(variants())[args.cutters]
        sync(args.device)

        def generate() -> None:
            text_to_image(sd, PROMPT, negative_prompt=NEGATIVE, sampler="euler", steps=args.steps, guidance_scale=7.5,
                          seed=0, height=args.size, width=args.size, progress=False, cutters=cutters,
                          on_step=lambda *_: stamps.append(time.perf_counter()) and None)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        if args.diffusers_allocator == "kept":  # the malloc setting ours makes on a CPU, to tell it apart
            from openldm.runtime import keep_freed_memory

            keep_freed_memory()
        pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), torch_dtype=dtype,
                                                        safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.to(args.device)
        if args.diffusers_layout == "channels_last":  # diffusers' documented CPU set-up (ours always uses it)
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        sync(args.device)

        def on_step_end(_pipe, _i, _t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        def generate() -> None:
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                 height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(0),
                 callback_on_step_end=on_step_end)
    load_s = time.perf_counter() - start
    rss_load = rss_peak_mib()
    image_s, step_s, decode_s = [], [], []
    for i in range(args.warmup + args.repeats):
        stamps.clear()
        t0 = time.perf_counter()
        generate()
        sync(args.device)
        t1 = time.perf_counter()
        if i >= args.warmup:
            image_s.append(t1 - t0)
            step_s.extend(b - a for a, b in zip(stamps, stamps[1:]))  # whole steps only (the first holds text encoding)
            decode_s.append(t1 - stamps[-1])
    from openldm.pipelines.common import compile_seconds

    return {"load_s": load_s, "rss_load_mib": rss_load, "rss_peak_mib": rss_peak_mib(), "image_s": image_s,
            "step_s": step_s, "decode_s": decode_s, "compile_s": compile_seconds()}


def taesd_folder(cache: Path) -> Path:
    """A random-weight TAESD (diffusers' AutoencoderTiny, its default topology) saved once beside the checkpoint."""
    folder = Path(cache) / "taesd"
    if not (folder / "config.json").is_file():
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(str(folder))
    return folder


def run_worker(side: str, args: argparse.Namespace, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--size", str(args.size), "--steps",
           str(args.steps), "--device", args.device, "--cache", str(args.cache), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--diffusers-layout", args.diffusers_layout,
           "--diffusers-allocator", args.diffusers_allocator,
           *(["--cutters", args.cutters] if args.cutters else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker ({dtype}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the hardware's own peaks, measured in the same run -------------------------------------------------------

def _rate(fn, flop: float, device: str, reps: int = 10) -> float:
    """GFLOP/s of ``fn`` (median of ``reps`` timed calls after 3 untimed ones)."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return flop / statistics.median(times) / 1e9


def hardware_peaks(device: str, dtypes: list[str]) -> list[tuple[str, str, float]]:
    """(kernel, dtype, GFLOP/s): a 2048x2048 matmul, and a 320-channel 3x3 convolution at 32x32 (batch 2) in NCHW
    and channels_last -- what one core kernel of the UNet reaches on this machine, the yardstick of the step rows."""
    rows = []
    with torch.no_grad():
        for name in dtypes:
            dtype = getattr(torch, name)
            a = torch.randn(2048, 2048, device=device, dtype=dtype)
            b = torch.randn(2048, 2048, device=device, dtype=dtype)
            rows.append(("matmul 2048x2048x2048", name, _rate(lambda: a @ b, 2 * 2048 ** 3, device)))
            x = torch.randn(2, 320, 32, 32, device=device, dtype=dtype)
            conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(device, dtype)
            flop = 2 * 2 * 320 * 320 * 9 * 32 * 32
            rows.append(("conv 320->320 3x3, 2x32x32, NCHW", name, _rate(lambda: conv(x), flop, device)))
            conv_cl, x_cl = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            rows.append(("conv 320->320 3x3, 2x32x32, channels_last", name,
                         _rate(lambda: conv_cl(x_cl), flop, device)))
    return rows


def guided_step_gflop(size: int) -> float:
    """FLOP of one guided sampler step (the UNet on a batch of 2) at ``size`` px, counted by torch's flop counter on
    the meta device (shapes only, no arithmetic; attention counted as its two matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    from openldm.models.presets import sd15_unet
    from openldm.models.unet import UNet

    with torch.device("meta"):
        unet = UNet(sd15_unet())
        x, t, ctx = torch.zeros(2, 4, size // 8, size // 8), torch.zeros(2), torch.zeros(2, 77, 768)
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as flops:
            unet(x, t, context=ctx)
    return flops.get_total_flops() / 1e9


def hardware_section(args: argparse.Namespace, step_s: dict[tuple[str, str], float]) -> None:
    """The same run's kernel peaks, and each per-step row as GFLOP/s and as a fraction of its dtype's matmul peak."""
    peaks = hardware_peaks(args.device, args.dtype)
    print(f"\n## This machine's peaks (same run, {torch.get_num_threads()} threads)\n")
    print("| kernel | dtype | GFLOP/s |\n|---|---|---:|")
    for kernel, dtype, rate in peaks:
        print(f"| {kernel} | {dtype} | {rate:,.0f} |")
    gflop = guided_step_gflop(args.size)
    print(f"\none guided step at {args.size}x{args.size} (UNet, batch 2): {gflop:,.0f} GFLOP\n")
    print("| dtype | side | s / step | GFLOP/s | fraction of the matmul peak |\n|---|---|---:|---:|---:|")
    for (dtype, side), seconds in step_s.items():
        peak = next(rate for kernel, d, rate in peaks if d == dtype and kernel.startswith("matmul"))
        print(f"| {dtype} | {side} | {seconds:.2f} | {gflop / seconds:,.0f} | {gflop / seconds / peak:.0%} |")


# ---- UNet iterations per second on a GPU -----------------------------------------------------------------------

GPU_VARIANTS = ("eager", "channels_last", "compile", "cuda_graphs")


def gpu_section(args: argparse.Namespace) -> None:
    """UNet iterations/s at 512x512 (64x64 latents), batch 2 (one guided step: cond + uncond), bf16, for ours and
    diffusers' UNet on the same random weights, per variant: eager; channels_last; torch.compile (inductor, on
    channels_last); compile with CUDA graphs (mode="reduce-overhead": the whole call replayed as one graph)."""
    device = args.gpu_device
    print(f"\n## UNet, one guided step (batch 2, 64x64 latents = 512x512 images, bfloat16, {device})\n")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("not run: CUDA is not available on this machine.")
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from unet import build_pair  # benchmarks/unet.py: both UNets on one set of random weights

    from openldm.models.presets import sd15_unet

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).to(device, dtype)
    t = torch.full((2,), 500, device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    print(f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else device}, "
          f"{args.gpu_repeats} runs of {args.gpu_iters} iterations each\n")
    print("| variant | ours (it/s) | diffusers (it/s) | ratio ours/diffusers | compile s (ours / diffusers) |")
    print("|---------|------------:|-----------------:|---------------------:|------------------------------|")
    for variant in args.gpu_variants:
        ours, ref = build_pair(sd15_unet(), device, dtype)
        ours.eval().requires_grad_(False), ref.eval().requires_grad_(False)
        xin = x
        if variant != "eager":
            ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        calls = {"ours": lambda m=ours: m(xin, t, context=context),
                 "diffusers": lambda m=ref: m(xin, t, encoder_hidden_states=context).sample}
        if variant in ("compile", "cuda_graphs"):
            mode = "reduce-overhead" if variant == "cuda_graphs" else None
            calls = {name: torch.compile(call, mode=mode) for name, call in calls.items()}
        rates: dict[str, list[float]] = {"ours": [], "diffusers": []}
        first: dict[str, float] = {}
        with torch.no_grad():
            for name in calls:
                sync(device)
                start = time.perf_counter()
                calls[name]()  # compiles when compiling
                sync(device)
                first[name] = time.perf_counter() - start
                for _ in range(4):
                    calls[name]()
            for r in range(args.gpu_repeats):
                for name in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(args.gpu_iters):
                        calls[name]()
                    sync(device)
                    rates[name].append(args.gpu_iters / (time.perf_counter() - start))
        ours_r, ref_r = statistics.median(rates["ours"]), statistics.median(rates["diffusers"])
        compile_s = f"{first['ours']:.0f} / {first['diffusers']:.0f}" if variant in ("compile", "cuda_graphs") else "-"
        print(f"| {variant} | {ours_r:.2f} | {ref_r:.2f} | {ours_r / ref_r:.3f} | {compile_s} |", flush=True)
        del ours, ref, calls
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\nratio above 1: ours faster (iterations per second).")


# ---- the table ------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps, at least 2 (default 4)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"], help="weights dtypes to run (default both)")
    parser.add_argument("--device", default="cpu", help="torch device for the CPU/GPU pipeline runs (default cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per process (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images per process before timing (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="ours/diffusers process pairs per dtype, alternating who goes first (default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint cache (default {DEFAULT_CACHE})")
    parser.add_argument("--gpu", action="store_true", help="also UNet iterations/s at 512x512, batch 2, bf16 (CUDA)")
    parser.add_argument("--gpu-iters", type=int, default=20, help="UNet calls per timed GPU run")
    parser.add_argument("--gpu-repeats", type=int, default=5, help="timed GPU runs per model")
    parser.add_argument("--gpu-variants", nargs="+", choices=GPU_VARIANTS, default=list(GPU_VARIANTS),
                        help="UNet variants of the --gpu table (default all)")
    parser.add_argument("--gpu-device", default="cuda", help="device of the --gpu table (default cuda; cpu for a "
                                                              "dry run of the script)")
    parser.add_argument("--gpu-only", action="store_true", help="only the --gpu table, not the pipeline table")
    parser.add_argument("--diffusers-layout", choices=["channels_last", "nchw"], default="channels_last",
                        help="diffusers' UNet/VAE memory format (default channels_last, its documented CPU set-up; "
                             "ours is always channels_last)")
    parser.add_argument("--diffusers-allocator", choices=["default", "kept"], default="default",
                        help="diffusers' process with glibc malloc as it comes (default) or with the setting ours "
                             "makes on a CPU (kept: openldm.runtime.keep_freed_memory), to tell that part apart")
    parser.add_argument("--compile", action="store_true",
                        help="also ours with torch.compile as --compile does it (compile_networks), weights frozen "
                             "(openldm --compile without LoRAs; the warm-up image compiles, keep --warmup >= 1), "
                             "rows marked 'compiled'")
    parser.add_argument("--no-peaks", action="store_true",
                        help="skip the machine's matmul / convolution peaks and the steps as fractions of them")
    parser.add_argument("--cutters", nargs="?", const=CUTTER_ROW, choices=[name for name, _ in variants()[1:]],
                        metavar="ROW", help="also ours with the step cutters of a row of step_cutters.py (default "
                        f"{CUTTER_ROW!r}), compiled too with --compile; rows marked 'cutters'")
    parser.add_argument("--taesd", action="store_true",
                        help="with --cutters: also ours with the cutters and TAESD (random weights) as the VAE")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (per-step time is measured between steps)")
    if args.worker:
        args.dtype = args.dtype[0]
        print(json.dumps(worker(args.worker, args)))
        return

    if args.gpu_only:
        gpu_section(args)
        return
    build_cache(args.cache)
    print(f"device={args.device} size={args.size}x{args.size} steps={args.steps} sampler=euler guidance=7.5 "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} warmup={args.warmup} "
          f"rounds={args.rounds} diffusers_layout={args.diffusers_layout} "
          f"diffusers_allocator={args.diffusers_allocator}", flush=True)
    rows = []
    step_medians: dict[tuple[str, str], float] = {}
    for dtype in args.dtype:
        sides = tuple(side for side in SIDES if (args.compile or "compiled" not in side)
                      and (args.cutters or "cutters" not in side) and (args.taesd or "taesd" not in side))
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                res = run_worker(side, args, dtype)
                results[side].append(res)
                print(f"  {dtype} {side}: load {res['load_s']:.2f} s, images " +
                      " ".join(f"{s:.2f}" for s in res["image_s"]) + " s, steps " +
                      " ".join(f"{s:.2f}" for s in res["step_s"]) + f" s, peak RSS {res['rss_peak_mib']:.0f} MiB",
                      flush=True)

        def med(side: str, key: str) -> float:
            values = [v for res in results[side] for v in (res[key] if isinstance(res[key], list) else [res[key]])]
            return statistics.median(values)

        for label, key, unit in (("load", "load_s", "s"), ("peak RSS after load", "rss_load_mib", "MiB"),
                                 ("peak RSS", "rss_peak_mib", "MiB"), ("seconds per image", "image_s", "s"),
                                 ("seconds per step", "step_s", "s"), ("decode", "decode_s", "s")):
            for side in sides[:-1]:
                ours, ref = med(side, key), med("diffusers", key)
                rows.append((dtype, f"{label} ({unit})" + side.removeprefix("ours").replace("-", ", "), ours,
                             ref, ours / ref))
        for side in sides:
            if "cutters" not in side:  # a cutter's steps are not all full guided UNet calls
                step_medians[(dtype, side)] = med(side, "step_s")
        if args.compile:
            rows.append((dtype, "compile (s), compiled", med("ours-compiled", "compile_s"), float("nan"), float("nan")))

    header = f"| {'dtype':<8} | {'measure':<46} | {'ours':>10} | {'diffusers':>10} | {'ratio':>6} |"
    print(markdown_header(header))
    for dtype, label, ours, ref, ratio in rows:
        ref_s, ratio_s = ("-", "-") if ref != ref else (f"{ref:.2f}", f"{ratio:.3f}")  # nan: no diffusers figure
        print(f"| {dtype:<8} | {label:<46} | {ours:>10.2f} | {ref_s:>10} | {ratio_s:>6} |")
    print("\nratio = median ours / median diffusers (below 1: ours faster or smaller). Wall-clock medians over "
          f"{args.rounds} process(es) x {args.repeats} image(s) per side; timings on a shared machine are noisy.")
    if not args.no_peaks:
        hardware_section(args, step_medians)
    if args.gpu:
        gpu_section(args)


if __name__ == "__main__":
    main()
