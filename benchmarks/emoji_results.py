"""The README's emoji results from the runs the emoji recipes leave under runs/ (each section skipped, and said
so, when its run is missing):

- autoencoders: reconstruction PSNR / SSIM of runs/emoji_autoencoder_kl_f4 and _f8 on the two held-out splits
  (unseen images of seen emoji; emoji never seen in training), the figures the factor was chosen by;
- text-to-image: a grid of samples from runs/emoji_text_minilm for seen emoji in the three styles, unseen emoji
  and novel combinations (docs/results/emoji-text.png).

    python benchmarks/emoji_results.py            # needs `openldm data emoji` and the runs
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from openldm.data import build_dataset
from openldm.data.emoji import _article as _a
from openldm.evaluation.grid import image_grid
from openldm.evaluation.metrics import psnr, ssim
from openldm.io.native import load_model
from openldm.pipelines.trained import load_run, sample_trained

SPLITS = ("heldout_images", "heldout_emoji")
STYLES = ("google emoji style", "twitter emoji style", "fluent emoji style")
SEEN = ("a red apple", "a cat face", "a grinning face", "a sun")
UNSEEN = ("a carrot", "a bell", "an alien monster", "a cloud with snow")  # in the held-out emoji split
NOVEL = ("a blue apple", "a green heart", "a grinning face with dark skin tone", "a red cat face")


def heldout_images(split: str) -> torch.Tensor:
    ds = build_dataset("emoji", {"split": split, "size": 64, "flip": False})
    return torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 3, 64, 64) in [-1, 1]


@torch.no_grad()
def autoencoder_table(runs: Path) -> list[str]:
    rows = ["| autoencoder | latents | split | images | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|"]
    for name in ("emoji_autoencoder_kl_f4", "emoji_autoencoder_kl_f8"):
        path = runs / name / "autoencoder.safetensors"
        if not path.is_file():
            print(f"skipped {name}: {path} is missing (train it with configs/{name}.yaml)")
            continue
        model = load_model(path).eval()
        for split in SPLITS:
            x = heldout_images(split)
            y = torch.cat([model.decode(model.encode(x[i:i + 128]).mode()).clamp(-1, 1)
                           for i in range(0, len(x), 128)])
            z = model.encode(x[:1]).mode()
            rows.append(f"| {name} | {' x '.join(map(str, z.shape[1:]))} | {split} | {len(x)} | "
                        f"{psnr(y, x).mean():.2f} | {ssim(y, x).mean():.4f} |")
    return rows


@torch.no_grad()
def text_grid(run: Path, out: Path, *, steps: int, guidance_scale: float) -> list[str] | None:
    if not (run / "config.yaml").is_file():
        print(f"skipped the text-to-image grid: {run} is missing (train it with configs/{run.name}.yaml)")
        return None
    model = load_run(run)
    prompts = [f"{subject}, {style}" for subject in SEEN for style in STYLES]
    heldout = {_a(r["name"]) for r in build_dataset("emoji", {"split": "heldout_emoji"}).records}
    if not heldout.issuperset(UNSEEN):
        raise SystemExit(f"not held out in this build: {sorted(set(UNSEEN) - heldout)}")
    prompts += [f"{p}, google emoji style" for p in UNSEEN] + [f"{p}, twitter emoji style" for p in NOVEL]
    rows = [sample_trained(model, prompt=p, num_images=4, steps=steps, guidance_scale=guidance_scale, seed=0)
            for p in prompts]
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out)  # one row per prompt: its 4 seeds side by side
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="docs/results/emoji-text.png")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    args = p.parse_args()
    torch.manual_seed(0)
    print("\n".join(autoencoder_table(Path(args.runs))))
    prompts = text_grid(Path(args.runs) / "emoji_text_minilm", Path(args.out), steps=args.steps,
                        guidance_scale=args.guidance_scale)
    if prompts:
        print(f"\n{args.out}: one row per prompt, 4 seeds each:")
        print("\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)))


if __name__ == "__main__":
    main()
