"""The last step of an SD image, latents to pixels, with SD's VAE and with TAESD, beside diffusers' AutoencoderKL and
AutoencoderTiny on the same random weights, in one run.

Random weights in SD v1.5's VAE topology and TAESD's (64 channels, blocks (1, 3, 3, 3) / (3, 3, 3, 1)); the same
tensors go to both sides. Each row: the median seconds of ``--repeats`` decodes of one (1, 4, size / 8, size / 8)
latent, the ratio ours / diffusers, and the ratio to our SD VAE in that dtype (what swapping in TAESD saves). The
sides alternate, warm-up calls first. What TAESD costs in quality needs its published weights, which this machine
cannot download: it is not measured here.

    python benchmarks/decode.py                      # 512 px, float32 and bfloat16
    python benchmarks/decode.py --size 256 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchlib import markdown_header

from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import tiny_autoencoder as tiny_keys
from openldm.models.autoencoder import AutoencoderKL, sd_autoencoder_kl
from openldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.02))
    return module.eval().requires_grad_(False)


def pairs() -> dict[str, tuple[torch.nn.Module, torch.nn.Module, callable, callable]]:
    """name -> (ours, diffusers', our decode, their decode), on the same weights."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its note on casting with .to() is not about these models
    cfg = sd_autoencoder_kl()
    theirs_kl = _random_(diffusers.AutoencoderKL(**vae_keys.autoencoder_config_to_diffusers(cfg)), 0)
    ours_kl = AutoencoderKL(cfg).eval().requires_grad_(False)
    ours_kl.load_state_dict(vae_keys.from_diffusers(theirs_kl.state_dict(), cfg))
    theirs_tiny = _random_(diffusers.AutoencoderTiny(), 1)
    ours_tiny = TinyAutoencoder(TinyAutoencoderConfig()).eval().requires_grad_(False)
    ours_tiny.load_state_dict(tiny_keys.from_diffusers(theirs_tiny.state_dict()))
    return {"SD VAE": (ours_kl, theirs_kl, ours_kl.decode, lambda z: theirs_kl.decode(z).sample),
            "TAESD": (ours_tiny, theirs_tiny, ours_tiny.decode, lambda z: theirs_tiny.decode(z).sample)}


def timed(fn, z: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(z)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(2))
    models = pairs()
    print(f"decode one {args.size}x{args.size} image, {args.threads} threads, median of {args.repeats}")
    print(markdown_header("| decoder | dtype | ours s | diffusers s | ours / diffusers | ours / our SD VAE |"))
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        base = None
        for name, (ours, theirs, decode_ours, decode_theirs) in models.items():
            for m in (ours, theirs):
                m.to(dtype=dtype, memory_format=torch.channels_last)
            x = z.to(dtype)
            for fn in (decode_ours, decode_theirs):
                timed(fn, x)  # warm-up
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for i in range(args.repeats):
                order = [("ours", decode_ours), ("theirs", decode_theirs)]
                for side, fn in order if i % 2 == 0 else order[::-1]:
                    times[side].append(timed(fn, x))
            a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
            base = a if base is None else base
            print(f"| {name} | {dtype_name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {a / base:.3f} |")


if __name__ == "__main__":
    main()
