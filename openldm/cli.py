"""The ``openldm`` command: one entry point, one typed function per subcommand.

Errors meant for the user (bad values, missing files) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from openldm.config import ConfigError
from openldm.training.common import TrainingDiverged

Command = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register a subcommand: the decorated function takes the parsed namespace; ``args`` adds its flags."""
    def deco(fn: Command) -> Command:
        _COMMANDS[name] = (fn, args or (lambda p: None), help)
        return fn
    return deco


# --- parsing: one-line errors, every default in --help, checked values -----------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: the value, "off" for a flag, "none" when unset; help that already says
    its default (``default: ...``) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.dest == "help" or action.required:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional
        default = action.default
        if action.nargs == 0:
            shown = "on" if default else "off"
        elif default is None or default == [] or default == "":
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(str(v) for v in default)
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, ``openldm CMD: error: MSG``, and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_in(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            accepted = f">= {low}" if high is None else f"in {low}..{high:,}" if high >= 10**6 else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{(what + ' ') if what else ''}{value} must be {accepted}")
        return value
    return convert


def _size(text: str) -> tuple[int, int]:
    """An argparse type: WIDTHxHEIGHT in pixels, both positive."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit() or not int(width) or not int(height):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT with positive integers, e.g. 512x768")
    return int(width), int(height)


def _seed(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2^64) (what a torch.Generator takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed={value} must be an integer in [0, 2^64)")
    return value


def _guidance(text: str) -> float:
    """An argparse type: a finite guidance scale >= 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"guidance scale {text} must be a finite number >= 0")
    return value


def _check_device(device: str, flag: str = "--device") -> None:
    """The device must exist here (CUDA asked for on a machine without it is an error, not a traceback)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"{flag} {device!r} is not a device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {device!r}: no CUDA device is available here; use cpu")


def _check_out_file(out: str, flag: str = "--out", suffixes: tuple[str, ...] = ()) -> None:
    """Before any work: an output file path in an existing folder (with one of ``suffixes``, when given)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{flag} {out!r} is a directory; give a file name such as "
                          f"{str(path / ('out' + (suffixes[0] if suffixes else '')))!r}")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {out!r}: the folder {str(path.parent)!r} does not exist; create it first")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {out!r} must end in {' or '.join(suffixes)}")


# --- openldm models ---------------------------------------------------------------------------------------------

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default=None, help="only presets of this model kind (e.g. unet, autoencoder_kl; "
                                                "default: every kind)")


@command("models", "list every model preset with its parameter count", _models_args)
def cmd_models(args: argparse.Namespace) -> int:
    from openldm.models.catalog import preset_rows

    rows = [r for r in preset_rows() if args.kind in (None, r.kind)]
    if not rows:
        raise ConfigError(f"no presets of kind {args.kind!r}" if args.kind else "no presets are registered")
    w_name = max(len(r.name) for r in rows)
    w_kind = max(len(r.kind) for r in rows)
    print(f"{'preset':<{w_name}}  {'kind':<{w_kind}}  {'parameters':>13}")
    for r in rows:
        print(f"{r.name:<{w_name}}  {r.kind:<{w_kind}}  {r.parameters:>13,}")
    return 0


# --- openldm samplers -------------------------------------------------------------------------------------------

@command("samplers", "list the registered samplers")
def cmd_samplers(args: argparse.Namespace) -> int:
    from openldm.registry import SAMPLERS

    for name, spec in SAMPLERS.items():
        doc = (getattr(spec, "fn", spec).__doc__ or "").strip().splitlines()
        print(f"{name:<18} {doc[0] if doc else ''}")
    return 0


# --- openldm demo, openldm toy ---------------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo.png", help="output name: writes demo-classes.png and demo-prompts.png")
    p.add_argument("--steps", type=_int_in(1), default=50, help="DDIM steps")
    p.add_argument("--guidance-scale", type=_guidance, default=None,
                   help="classifier-free guidance scale (default: the model's recommended, 2 for the bundled model)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    p.add_argument("--retrain", action="store_true", help="train the model from scratch with the recipes in configs/ "
                                                          "first (about an hour on a 2-core CPU), then sample it")
    p.add_argument("--work-dir", default="runs/demo", help="where --retrain keeps its runs (resumable)")
    p.add_argument("--update-bundle", action="store_true", help="with --retrain: replace the bundled model with the "
                                                                "retrained one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("demo", "sample grids from the bundled models (Fashion-MNIST classes and prompts; colour emoji prompts); "
                 "--retrain trains the Fashion-MNIST one first",
         _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from openldm.bundled import available, bundled_dir
    from openldm.pipelines.demo import PROMPTS, run_demo

    if args.update_bundle and not args.retrain:
        raise ConfigError("--update-bundle replaces the bundled model with a retrained one; give --retrain too")
    model_dir = bundled_dir()
    if args.retrain:
        from openldm.pipelines.trained import export_run
        from openldm.training.recipes import retrain

        model_dir = export_run(retrain(args.work_dir, progress=not args.quiet), f"{args.work_dir}/model")
        print(f"exported to {model_dir}")
    if args.retrain and args.update_bundle:
        import shutil

        target = bundled_dir(must_exist=False)
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        print(f"bundled model replaced: {target}")
    from openldm.io.run_dir import read_sampling

    guidance = read_sampling(model_dir)["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    for path in run_demo(model_dir, args.out, steps=args.steps, guidance_scale=guidance, seed=args.seed):
        print(path)
    if "emoji" in available():  # the colour model's grid beside: demo-emoji-prompts.png
        emoji, out = bundled_dir("emoji"), Path(args.out)
        guidance = read_sampling(emoji)["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
        for path in run_demo(emoji, out.with_name(f"{out.stem}-emoji{out.suffix}"), steps=args.steps,
                             guidance_scale=guidance, seed=args.seed, prompts=PROMPTS["emoji"]):
            print(path)
    return 0


def _toy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_int_in(1), nargs="+", default=[10, 25, 100],
                   help="sampling step counts to compare")
    p.add_argument("--samples", type=_int_in(1, 10**7), default=8000, help="number of points drawn per sampler "
                                                                         "(at most 10,000,000)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed")


@command("toy", "sample a known 2-D Gaussian mixture with every sampler and report how close each gets", _toy_args)
def cmd_toy(args: argparse.Namespace) -> int:
    from openldm.evaluation.toy import mixture_report

    print(mixture_report(steps=args.steps, num_samples=args.samples, seed=args.seed))
    return 0


# --- openldm generate -------------------------------------------------------------------------------------------

def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampler, guidance, seed and output flags shared by `generate` and `sample`. Sampler, steps, guidance
    and size default to the model's recommended settings (its sampling.json; SD weights: euler, 30, 7.5, 512)."""
    said = "default: the model's recommended setting"
    p.add_argument("--sampler", default=None, help=f"sampler name (see `openldm samplers`; {said})")
    p.add_argument("--karras", action="store_true", default=None,
                   help=f"Karras et al. 2022 noise levels (sigma-space samplers; {said})")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps ({said})")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance scale, 1 = off ({said})")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2023)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--subseed", type=_seed, default=None, metavar="SEED",
                   help="A1111's variation seed: with --subseed-strength, each image's noise moves that far towards "
                        "this seed's (image i of a batch: SEED + i, all on the one --seed)")
    p.add_argument("--subseed-strength", type=float, default=0.0, metavar="S",
                   help="how far towards the variation seed, in [0, 1] (default 0 = off)")
    p.add_argument("--seed-resize-from", type=_size, default=None, metavar="WxH",
                   help="A1111's seed resize: keep the noise the seed gives at this size, in the middle of the image")
    p.add_argument("--height", type=int, default=None, help=f"image height in pixels ({said})")
    p.add_argument("--width", type=int, default=None, help=f"image width in pixels ({said})")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt/label; files get -0, -1, ... suffixes")
    p.add_argument("--out", default="out.png", help="output PNG path (the PNG carries the parameters)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _cutter_args(p)


def _cutter_args(p: argparse.ArgumentParser) -> None:
    """Training-free step cutters (fewer or cheaper network evaluations; all off by default)."""
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only at noise levels sigma_lo <= sigma <= sigma_hi, one conditional network call "
                        "elsewhere (Kynkaanniemi et al. 2024; e.g. 0.28 5.42)")
    p.add_argument("--deepcache", type=int, default=1, metavar="N",
                   help="DeepCache (Ma et al. 2023): a full UNet pass every N network calls, only the shallow "
                        "branch on the kept deep features in between (default 1 = off)")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging (ToMe for SD, Bolya & Hoffman 2023): merge this share of the tokens before "
                        "self-attention at the top level, in [0, 1) (default 0 = off; e.g. 0.5)")
    p.add_argument("--tome-max-downsample", type=int, default=1, metavar="K",
                   help="with --tome: merge at levels up to K times below the latent size (1, 2, 4, ...; default 1)")


def _trained_args(p: argparse.ArgumentParser) -> None:
    """Inputs only models trained here read (class labels, segmentation masks, low-res images), and output options."""
    p.add_argument("--class-label", default=None, help="class index or name (class-conditional models; the bundled "
                                                       "Fashion-MNIST model: 0-9 or a name such as 'ankle boot')")
    p.add_argument("--low-res", default=None, help="low-resolution image to upscale (super-resolution models)")
    p.add_argument("--noise-level", type=int, default=None, help="noise augmentation level of --low-res "
                                                                 "(default: the model's)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--vae", default=None, help="another autoencoder in place of the model's. Stable Diffusion: a "
                                               "published VAE file or diffusers folder (CompVis or diffusers layout, "
                                               "e.g. vae-ft-mse-840000-ema-pruned.safetensors; A1111's sd_vae); a run: "
                                               "one with the same encoder, e.g. a decoder fine-tuned with "
                                               "decoder_only (default: the model's own)")
    p.add_argument("--grid", action="store_true", help="write all images as one grid PNG instead of one file each")
    p.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for another condition of the model, by its declared name (e.g. brightness=0.8; "
                        "`openldm generate --model M --input help=1` lists them); repeatable")


def _prediction_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", default=None, choices=["eps", "v"],
                   help="what the SD network predicts (default: what the model says: a single file's sidecar .yaml, "
                        "a folder's scheduler config, else eps; SD 2.x single files without a .yaml need it: v for "
                        "768 px models, eps for 512 px -base models)")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights' dtype (default float32: the reference's pixels for a seed); auto: bfloat16 where "
                        "the CPU (AMX, AVX512-BF16) or GPU computes it natively, else float32")


def _compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) the UNet (and off a CPU the autoencoder's decoder, which inductor "
                        "slows down on a CPU): the first image compiles "
                        "them (minutes on a CPU, the time is reported), later steps and images reuse the graphs "
                        "(needs a C++ compiler on a CPU). Weights are frozen into the graphs (faster) unless "
                        "--lora-dir is given; the first request with LoRAs recompiles the UNet with live weights")


def _chosen_dtype(args: argparse.Namespace) -> str:
    """``--dtype``, with auto resolved for ``--device`` and the choice said on stderr."""
    if getattr(args, "dtype", "float32") != "auto":
        return getattr(args, "dtype", "float32")
    from openldm.pipelines.common import auto_dtype

    dtype, why = auto_dtype(getattr(args, "device", "cpu"))
    name = str(dtype).removeprefix("torch.")
    print(f"--dtype auto: {name} ({why})", file=sys.stderr)
    return name


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="SD v1 / 2.x checkpoint (.safetensors/.ckpt single file, diffusers "
                                                 "folder or openldm folder) or a run directory of `openldm train`; "
                                                 "default: the bundled Fashion-MNIST model")
    p.add_argument("--prompt", default=None, help="what to draw (default: none)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line (blank lines skipped): an image each, prompt i with seed SEED + i, "
                        "written as OUT-i.png; under `torchrun --nproc_per_node N` the prompts are shared out over "
                        "the processes and every image is written once (default: none)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional branch of CFG)")
    _sampling_args(p)
    _trained_args(p)
    p.add_argument("--init-image", default=None, help="image-to-image (or inpainting) input image")
    p.add_argument("--strength", type=float, default=None, help="how much of the init image to redraw, in [0, 1] "
                                                               "(default: Stable Diffusion 0.75, inpainting 1; "
                                                               "models trained here 1)")
    p.add_argument("--mask", default=None, help="inpainting mask (white = redraw); needs --init-image. Models trained "
                                                "here: alone, a segmentation mask")
    p.add_argument("--paste-back", action="store_true", help="inpainting: paste the unmasked original pixels back")
    p.add_argument("--clip-skip", type=int, default=1, help="use the text encoder's N-th last layer (A1111 count; "
                                                            "Stable Diffusion weights)")
    p.add_argument("--chunked", action="store_true", help="encode prompts over 75 tokens in chunks (A1111; Stable "
                                                          "Diffusion weights)")
    p.add_argument("--prompt-weighting", default="none", choices=["none", "a1111"],
                   help="a1111: read A1111's prompt syntax, (word:1.3) [word] BREAK, over 75-token chunks (default "
                        "none: the prompt as diffusers reads it)")
    p.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings (.pt, .safetensors, "
                                                          ".bin; A1111 or diffusers layout) that prompts use by name "
                                                          "(default: none)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in overlapping tiles (Stable "
                                                             "Diffusion weights)")
    p.add_argument("--tiling", action="store_true", help="seamless tiling (A1111's Tiling): the networks pad "
                                                         "circularly, so the image repeats without a seam (Stable "
                                                         "Diffusion weights)")
    p.add_argument("--hires-scale", type=float, default=None,
                   help="A1111's hires fix (Stable Diffusion weights): sample at --width x --height, upscale by this "
                        "(in [1, 4]) and redraw at that size with --strength (default 0.75) (default: one pass)")
    p.add_argument("--hires-upscaler", default=None,
                   help="the hires fix's upscaler, by A1111's name: Latent (default), 'Latent (antialiased)', "
                        "'Latent (bicubic)', 'Latent (bicubic antialiased)', 'Latent (nearest)', "
                        "'Latent (nearest-exact)', Lanczos, Nearest, None")
    p.add_argument("--hires-steps", type=int, default=None, help="the hires pass's steps (default: --steps)")
    p.add_argument("--styles-file", default=None, help="A1111's styles.csv (name,prompt,negative_prompt) that --style "
                                                       "names come from")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply this style of --styles-file to the prompt and negative prompt, as A1111 does "
                        "(repeatable, applied in order)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    _dtype_arg(p)
    _compile_arg(p)
    p.add_argument("--unsafe-load", action="store_true", help="allow .ckpt files that need full unpickling "
                                                              "(only for files you trust)")
    _prediction_arg(p)
    p.add_argument("--from-png", default=None, help="regenerate with the parameters stored in this PNG (its model "
                                                    "too); flags given beside it replace the stored values")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply this LoRA (.safetensors, kohya/A1111 or diffusers layout) with WEIGHT (default 1, may "
                        "be negative), SD weights only; repeatable (default: none)")
    p.add_argument("--lora-dir", default=None, help="folder where prompt tags <lora:NAME:WEIGHT> find NAME.safetensors "
                                                   "(default: none)")


@command("generate", "generate images: the bundled Fashion-MNIST model by default (--prompt or --class-label), a "
                     "model trained here, or Stable Diffusion v1 weights (text-to-image, image-to-image, inpainting)",
         _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    return _generate(args)


def _print_line(text) -> None:
    """``text`` and its newline in one write: under torchrun the processes share stdout, and with
    PYTHONUNBUFFERED ``print`` writes the newline apart, so another process's line could land between them."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompts-file``'s prompts, one a line (blank lines skipped)."""
    if args.prompt is not None or getattr(args, "from_png", None) is not None:
        raise ConfigError("--prompts-file gives the prompts; drop --prompt / --from-png")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {args.prompts_file!r}: no such file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts-file {args.prompts_file!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not prompts:
        raise ConfigError(f"--prompts-file {args.prompts_file!r} holds no prompt")
    return prompts


def _process_device(args: argparse.Namespace) -> str:
    """``--device``; under torchrun, "cuda" is this process's GPU (LOCAL_RANK)."""
    device = getattr(args, "device", "cpu")
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if device == "cuda" and local is not None else device


def _request(args: argparse.Namespace, inputs: dict):
    from openldm.pipelines.generate import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt, negative_prompt=getattr(args, "negative_prompt", ""), class_label=args.class_label,
        seed=args.seed, sampler=args.sampler, karras=args.karras, steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, width=args.width,
        height=args.height, num_images=args.num_images, init_image=args.init_image, strength=args.strength,
        mask=args.mask, paste_back=getattr(args, "paste_back", False), inputs=inputs,
        clip_skip=getattr(args, "clip_skip", 1), chunked=getattr(args, "chunked", False),
        prompt_weighting=getattr(args, "prompt_weighting", "none"), vae_tiling=getattr(args, "vae_tiling", False),
        hires_scale=getattr(args, "hires_scale", None), hires_upscaler=getattr(args, "hires_upscaler", None),
        hires_steps=getattr(args, "hires_steps", None), tiling=getattr(args, "tiling", False),
        subseed=args.subseed, subseed_strength=args.subseed_strength, seed_resize_from=args.seed_resize_from,
        **_cutter_fields(args))


def _styles(path: str | None, names: list[str]) -> list:
    """The styles ``names`` of the styles file ``path`` (checked even when no style is named)."""
    from openldm.pipelines.styles import choose, read_styles

    if path is None:
        if names:
            raise ConfigError("--style needs --styles-file FILE (A1111's styles.csv)")
        return []
    try:
        styles = read_styles(path)
    except ValueError as e:
        raise ConfigError(f"--styles-file: {e}") from None
    try:
        return choose(styles, names)
    except ValueError as e:
        raise ConfigError(f"--style: {e}") from None


def _lora_args(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``--lora FILE[:WEIGHT]`` values as (file, weight) pairs (weight 1 when left out); each file must exist."""
    loras = []
    for value in getattr(args, "lora", []):
        path, _, weight = value.rpartition(":")
        try:
            pair = (path, float(weight)) if path else (value, 1.0)
        except ValueError:
            pair = (value, 1.0)  # no weight: the colon belongs to the path
        if not Path(pair[0]).is_file():
            raise ConfigError(f"--lora {value!r}: no file {pair[0]!r}; give FILE[:WEIGHT], e.g. style.safetensors:0.8")
        loras.append(pair)
    lora_dir = getattr(args, "lora_dir", None)
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise ConfigError(f"--lora-dir {lora_dir!r} is not a folder")
    return loras



def _cutter_fields(args: argparse.Namespace) -> dict:
    """The step cutters' fields (StepCutters, GenerationRequest) from ``_cutter_args``' flags."""
    return {"guidance_interval": None if args.guidance_interval is None else tuple(args.guidance_interval),
            "deepcache_interval": args.deepcache, "token_merging_ratio": args.tome,
            "token_merging_max_downsample": args.tome_max_downsample}


def _explicit(args: argparse.Namespace) -> set[str]:
    """The destinations of the flags written on the command line (not left at their defaults)."""
    parser = args._parser
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(args._argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(given))


def _check_output(out: str) -> None:
    """Before any work: the output must be a PNG path in an existing folder (PNGs carry the parameters)."""
    _check_out_file(out)
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out!r} must end in .png (the images carry their parameters in a PNG text chunk; "
                          "convert the PNG for other formats)")


def _check_image_file(value: str, flag: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not Path(value).is_file():
        raise ConfigError(f"{flag} {value!r} does not exist")
    try:
        with Image.open(value) as img:
            img.verify()  # the file's structure and checksums
        with Image.open(value) as img:
            img.load()  # the pixels themselves decode
    except Image.DecompressionBombError as e:
        raise ConfigError(f"{flag} {value!r} is too large to read ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{flag} {value!r} is not a readable image ({e.__class__.__name__}); give a PNG or "
                          "JPEG") from None


def _input_value(text: str):
    """A number when it reads as one, else the text (a path for image inputs)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _generate(args: argparse.Namespace) -> int:
    """`generate` and `sample`: load the model behind the one generation interface, make the images, save them
    as PNGs carrying their parameters (one file each, or a grid)."""
    from dataclasses import replace

    import torch

    from openldm.data.image_io import pil_to_tensor
    from openldm.evaluation.grid import tile
    from openldm.io.run_dir import resolve_source
    from openldm.pipelines import read_png_params, save_images
    from openldm.pipelines.common import output_paths
    from openldm.pipelines.generate import process_share, request_from_params
    from openldm.pipelines.sources import load_generator
    from openldm.pipelines.styles import apply_styles

    if args.model is not None:
        resolve_source(args.model)  # a missing model is named first, before any other flag
    _check_output(args.out)
    prompts = _read_prompts(args) if getattr(args, "prompts_file", None) else None
    _check_device(getattr(args, "device", "cpu"))
    for flag in ("from_png", "init_image", "mask", "low_res"):
        value = getattr(args, flag, None)
        if value is not None:
            _check_image_file(value, "--" + flag.replace("_", "-"))
    loras = _lora_args(args)
    stored = read_png_params(args.from_png) if getattr(args, "from_png", None) else None
    model = args.model or (stored.model if stored is not None else None)
    generator = load_generator(model, device=_process_device(args), dtype=_chosen_dtype(args),
                               unsafe_load=getattr(args, "unsafe_load", False), ema=not args.raw_weights,
                               vae=args.vae, prediction=getattr(args, "prediction_type", None),
                               lora_dir=getattr(args, "lora_dir", None),
                               embeddings_dir=getattr(args, "embeddings_dir", None),
                               compile=getattr(args, "compile", False))
    caps = generator.capabilities
    if (loras or getattr(args, "lora_dir", None)) and caps.kind != "stable-diffusion":
        raise ConfigError(f"--lora and --lora-dir are for Stable Diffusion weights; model {caps.name!r} is not")
    inputs = {f.name: getattr(args, f.name) for f in caps.inputs
              if f.name != "mask" and getattr(args, f.name, None) is not None}
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--input {item!r} must be NAME=VALUE")
        if name == "help":
            for f in caps.inputs:
                print(f"{f.name:<14} {f.type:<10} {f.help}")
            if not caps.inputs:
                print(f"model {caps.name!r} takes no other inputs")
            return 0
        inputs[name] = _input_value(value)
    for flag in ("low_res", "noise_level"):
        if getattr(args, flag, None) is not None and flag not in inputs:
            raise ConfigError(f"--{flag.replace('_', '-')} is not an input of model {caps.name!r}; its inputs: "
                              f"{', '.join(f.name for f in caps.inputs) or 'none'}")
    request = _request(args, inputs)
    if stored is not None:  # the PNG's parameters, with the flags given beside --from-png in their place
        explicit = _explicit(args) | ({"inputs"} if inputs else set())
        given = {name: value for name, value in vars(request).items() if name in explicit}
        request = replace(request_from_params(stored), **given)
        pick = stored.batch_index if stored.num_images > 1 and "num_images" not in given else None
    request.loras = loras
    chosen = _styles(getattr(args, "styles_file", None), getattr(args, "style", []))
    if chosen:
        request.prompt, request.negative_prompt = apply_styles(request.prompt or "", request.negative_prompt, chosen)
    if prompts is not None:
        prompts = [apply_styles(p, "", chosen)[0] for p in prompts]
        request.prompt = prompts[0]
    if caps.kind == "stable-diffusion" and request.prompt is None:
        raise ConfigError("--prompt is required for Stable Diffusion weights")
    if caps.kind == "stable-diffusion" and not args.quiet:
        from openldm.pipelines.loras import request_loras

        for path, weight in request_loras([request.prompt, request.negative_prompt], loras, generator.lora_dir)[1]:
            print(f"LoRA {generator.loras.read(path).summary()}; weight {weight:g}", file=sys.stderr)
    if prompts is not None:  # prompt i with seed + i, to OUT-i.png; this process's share of them under torchrun
        outs = output_paths(args.out, len(prompts))
        for i in process_share(len(prompts)):
            result = generator.generate(replace(request, prompt=prompts[i], seed=request.seed + i),
                                        progress=not args.quiet)
            for path in save_images(result.images, outs[i], result.params[0]):
                _print_line(path)
        _report_compile(generator)
        return 0
    result = generator.generate(request, progress=not args.quiet)
    images, params = result.images, result.params
    if stored is not None and pick is not None:
        images, params = [images[pick]], [replace(params[pick], num_images=1)]
    if args.grid:
        images = [tile(torch.stack([pil_to_tensor(im) * 2 - 1 for im in images]))]
        params = [replace(params[0], num_images=1)]
    for path in save_images(images, args.out, params[0]):
        _print_line(path)
    _report_compile(generator)
    return 0


def _report_compile(generator) -> None:
    if generator.compiled is not None:
        from openldm.pipelines.common import compile_seconds

        print(f"--compile: {compile_seconds():.1f} s of this run compiled the networks ({generator.compiled})",
              file=sys.stderr)


def _train_args_for(config: str, example: str) -> Callable[[argparse.ArgumentParser], None]:
    """The flags every training command takes: its config file, --resume, --quiet and dotted overrides."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help=f"YAML file of a {config} (e.g. {example}; default: the "
                                                      f"{config} defaults)")
        p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds a run "
                       "(its checkpoints and metrics are deleted)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("overrides", nargs="*", help="dotted overrides, anywhere on the command line, e.g. "
                                                    "steps=2000 optim.lr=3e-4 batch_size=64")
    return add


# --- openldm sample ---------------------------------------------------------------------------------------------

def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run directory written by `openldm train`")
    p.add_argument("--prompt", default=None, help="caption (text-conditional models)")
    p.add_argument("--mask", default=None, help="segmentation mask image, or the inpainting mask with --init-image")
    p.add_argument("--init-image", default=None, help="image to inpaint (with --mask) or redraw (with --strength)")
    p.add_argument("--strength", type=float, default=None, help="image-to-image strength in (0, 1] (default: 1)")
    _trained_args(p)
    _sampling_args(p)


@command("sample", "sample from a model trained with `openldm train` (class, caption, mask, low-res, inpaint)",
         _sample_args)
def cmd_sample(args: argparse.Namespace) -> int:
    return _generate(args)


# --- openldm serve ----------------------------------------------------------------------------------------------

def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=None, help="model sources to serve (run directories, SD files, "
                                                           "diffusers folders; a folder serves every model under it; "
                                                           "default: the bundled Fashion-MNIST model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(0, 65535, "port"), default=7860, help="port (default 7860, as AUTOMATIC1111)")
    p.add_argument("--api-auth", default=None, help="USER:PASS[,USER:PASS]: HTTP Basic auth on every route "
                                                    "(default: none, open)")
    p.add_argument("--cors-allow-origins", default=None, help="comma-separated origins allowed by CORS "
                                                              "(default: none)")
    p.add_argument("--max-batch", type=_int_in(1), default=8, help="most images one request may ask for "
                                                                         "(default 8)")
    p.add_argument("--max-pixels", type=_int_in(1), default=1024 * 1024,
                   help="most pixels (width x height x images) one request may ask for (default 1048576)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    _dtype_arg(p)
    _compile_arg(p)
    p.add_argument("--lora-dir", default=None, help="folder where prompt tags <lora:NAME:WEIGHT> (API and page) find "
                                                    "NAME.safetensors")
    p.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings that prompts of "
                                                          "Stable Diffusion models use by name")
    p.add_argument("--styles-file", default=None, help="A1111's styles.csv (name,prompt,negative_prompt), whose styles "
                                                       "A1111 API requests name in 'styles' (default: none)")
    p.add_argument("--vae", default=None, help="a VAE file or diffusers folder the Stable Diffusion models take in "
                                               "place of their own (A1111's --vae-path)")
    p.add_argument("--vae-dir", default=None, help="folder of VAEs that requests name (A1111's models/VAE: "
                                                   "override_settings.sd_vae, the sd_vae option, the page)")
    p.add_argument("--preview-vae", default=None, help="a VAE the live previews of Stable Diffusion models decode "
                                                       "with, e.g. taesd_decoder.pth (A1111's TAESD live preview; "
                                                       "default: a linear map of the latents)")


@command("serve", "serve a web page and an AUTOMATIC1111-compatible HTTP API (/sdapi/v1/...) over one job queue",
         _serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    from openldm.web.app import serve

    _check_device(args.device)
    origins = [o.strip() for o in args.cors_allow_origins.split(",") if o.strip()] if args.cors_allow_origins else None
    if args.api_auth is not None and any(":" not in pair for pair in args.api_auth.split(",")):
        raise ConfigError("--api-auth takes USER:PASS pairs separated by commas")
    for flag in ("lora_dir", "vae_dir"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"--{flag.replace('_', '-')} {folder!r} is not a folder")
    for flag in ("vae", "preview_vae"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"--{flag.replace('_', '-')} {path!r} does not exist")
    _styles(args.styles_file, [])
    serve(args.model, host=args.host, port=args.port, api_auth=args.api_auth, cors_allow_origins=origins,
          max_batch=args.max_batch, max_pixels=args.max_pixels, device=args.device,
          dtype=_chosen_dtype(args), lora_dir=args.lora_dir,
          embeddings_dir=args.embeddings_dir, compile=args.compile, styles_file=args.styles_file, vae=args.vae,
          vae_dir=args.vae_dir, preview_vae=args.preview_vae)
    return 0


# --- openldm evaluate -------------------------------------------------------------------------------------------

def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="run directory of `openldm train` on Fashion-MNIST or the emoji "
                                                 "data, or a bundled model (default: the Fashion-MNIST one)")
    p.add_argument("--step", type=_int_in(0), default=None, help="evaluate the EMA snapshot of this training "
                                                                       "step (default: the last weights)")
    p.add_argument("--num-samples", type=int, default=1000, help="generated (and real) images per task and scale")
    p.add_argument("--sampler", default="ddim", help="sampler name (see `openldm samplers`)")
    p.add_argument("--steps", type=_int_in(1), default=50, help="sampling steps")
    p.add_argument("--karras", action="store_true", help="Karras et al. 2022 noise levels")
    p.add_argument("--guidance-scale", type=_guidance, nargs="+", default=[1.0, 3.0],
                   help="classifier-free guidance scales to evaluate (1 = off)")
    p.add_argument("--tasks", nargs="+", default=None, help="class, text, mask, super_resolution, inpaint, "
                                                            "unconditional (default: all the model supports)")
    p.add_argument("--classifier", default=None, help="Fashion-MNIST classifier / emoji style judge file (default: "
                                                      "trained once and cached under $OPENLDM_CACHE, ~/.cache/openldm)")
    p.add_argument("--clip", default=None, help="emoji models: the judge CLIP of text-image agreement and FID, "
                                                "trained apart from the model's text encoder (`openldm train-clip "
                                                "--config configs/emoji_clip.yaml` writes runs/emoji_clip/clip.safetensors)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    p.add_argument("--batch-size", type=_int_in(1), default=250, help="images drawn at once (the seeds follow the "
                                                                      "batches: the same size gives the same images)")
    p.add_argument("--out", default=None, help="also write the report as JSON here (default: print it only)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    _cutter_args(p)


@command("evaluate", "measure a Fashion-MNIST generator (class accuracy, FID/KID in a classifier's features beside "
                     "real held-out images, PSNR/SSIM, IoU) or an emoji one (style accuracy, text-image agreement and "
                     "FID/KID under a judge CLIP, per held-out split)", _evaluate_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from openldm.evaluation.classifier import load_classifier
    from openldm.io.run_dir import resolve_source
    from openldm.pipelines.common import StepCutters
    from openldm.pipelines.evaluate import EvalSettings, evaluate_model, format_table
    from openldm.pipelines.evaluate_emoji import evaluate_emoji
    from openldm.pipelines.trained import load_run
    from openldm.registry import SAMPLERS

    args.model = str(resolve_source(args.model))  # None: the bundled model; a missing one is named first
    if args.out is not None:
        _check_out_file(args.out)
    SAMPLERS.get(args.sampler)  # before a classifier is trained or an image drawn
    settings = EvalSettings(num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                            guidance_scales=args.guidance_scale, karras=args.karras, seed=args.seed, tasks=args.tasks,
                            batch_size=args.batch_size, cutters=StepCutters(**_cutter_fields(args)))
    model = load_run(args.model, step=args.step)
    say = None if args.quiet else (lambda message: print(f"evaluating {message}", file=sys.stderr, flush=True))
    if model.config.data.name == "emoji":
        report = evaluate_emoji(model, _emoji_judges(model, args), settings, progress=say)
    else:
        if args.clip is not None:
            raise ConfigError("--clip judges emoji models; this model was trained on "
                              f"{model.config.data.name!r}: leave --clip out")
        classifier = load_classifier(args.classifier, progress=not args.quiet)
        report = evaluate_model(model, classifier, settings, progress=say)
    report["model"] = args.model
    report["step"] = args.step
    print(format_table(report["rows"]))
    if args.out:
        from openldm.io.files import atomic_path

        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
    return 0


def _emoji_judges(model, args: argparse.Namespace):
    """The style judge and the judge CLIP for an emoji model; the CLIP must not be the one the model conditions on."""
    from openldm.evaluation.emoji import EmojiJudges, load_judge_clip, load_style_judge

    if args.clip is None:
        raise ConfigError("an emoji model is judged by a CLIP trained apart from its text encoder: train one with "
                          "`openldm train-clip --config configs/emoji_clip.yaml` and pass --clip "
                          "runs/emoji_clip/clip.safetensors")
    if not Path(args.clip).is_file():
        raise ConfigError(f"--clip {args.clip!r} does not exist; give a clip.safetensors of `openldm train-clip`")
    from openldm.io.files import find_in_run

    own = {find_in_run(c.options["path"], Path(args.model), "text encoder").resolve()  # as load_run found them
           for c in model.config.conditions if c.options.get("path")}
    if Path(args.clip).resolve() in own:
        raise ConfigError(f"--clip {args.clip!r} is the text encoder this model conditions on; judge it with a CLIP "
                          "trained apart (another seed: configs/emoji_clip.yaml)")
    style = load_style_judge(args.classifier, root=model.config.data.options.get("root"), size=model.image_size[0])
    return EmojiJudges(style=style, clip=load_judge_clip(args.clip))


# --- openldm train-autoencoder ----------------------------------------------------------------------------------

@command("train-autoencoder", "train a KL or VQ autoencoder (reconstruction + LPIPS + PatchGAN)",
         _train_args_for("AutoencoderTrainConfig", "configs/fmnist_autoencoder_kl.yaml"))
def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from openldm.config import load
    from openldm.training.autoencoder import AutoencoderTrainConfig, train_autoencoder

    cfg = load(AutoencoderTrainConfig, args.config, args.overrides)
    _check_device(cfg.device, "device=")
    out = train_autoencoder(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"step {out['step']}; latent scale factor {out['scaling_factor']:.5f}; autoencoder saved as {out['autoencoder']}")
    return 0


# --- openldm train-clip -----------------------------------------------------------------------------------------

@command("train-clip", "train a small CLIP contrastively on captioned images; report retrieval numbers",
         _train_args_for("CLIPTrainConfig", "configs/fmnist_clip.yaml"))
def cmd_train_clip(args: argparse.Namespace) -> int:
    from openldm.config import load
    from openldm.training.clip import CLIPTrainConfig, summary, train_clip

    cfg = load(CLIPTrainConfig, args.config, args.overrides)
    _check_device(cfg.device, "device=")
    out = train_clip(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if out["retrieval"] is None:
        print(f"stopped at step {out['step']}; CLIP saved as {out['clip']}; continue with --resume")
        return 0
    print(f"step {out['step']}; {summary(out['retrieval'])}")
    print(f"CLIP saved as {out['clip']}; retrieval report in {cfg.out_dir}/retrieval.json")
    return 0


# --- openldm convert --------------------------------------------------------------------------------------------

def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a single-file checkpoint (.safetensors/.ckpt), a diffusers folder or an openldm folder")
    p.add_argument("dst", help="output path (a .safetensors file for --to original, else a folder)")
    p.add_argument("--to", required=True, choices=["original", "diffusers", "openldm"], help="layout to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast weights (default: keep the source's dtype)")
    p.add_argument("--use-ema", action="store_true", help="take the model_ema.* UNet weights of a training checkpoint")
    p.add_argument("--unsafe-load", action="store_true", help="allow .ckpt files that need full unpickling "
                                                              "(only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    _prediction_arg(p)


@command("convert", "convert SD v1 / 2.x checkpoints between the original, diffusers and openldm layouts",
         _convert_args)
def cmd_convert(args: argparse.Namespace) -> int:
    from openldm.io.sd import convert
    from openldm.pipelines.common import resolve_dtype

    out = convert(args.src, args.dst, to=args.to, dtype=resolve_dtype(args.dtype), unsafe_load=args.unsafe_load,
                  use_ema=args.use_ema, overwrite=args.overwrite, prediction=args.prediction_type)
    print(out)
    return 0


# --- openldm train ----------------------------------------------------------------------------------------------

@command("train", "train a (latent) diffusion model; conditions, data and UNet named in the config",
         _train_args_for("DiffusionTrainConfig", "configs/fmnist_class_text.yaml"))
def cmd_train(args: argparse.Namespace) -> int:
    from openldm.config import apply_overrides, from_dict, load, load_file
    from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

    data = apply_overrides(load_file(args.config) if args.config else {}, args.overrides)
    if "textual_inversion" in data:  # a textual-inversion section: learn an embedding instead
        from openldm.training.textual_inversion import TextualInversionConfig

        if set(data) != {"textual_inversion"}:
            raise ConfigError(f"a config with a textual_inversion section holds nothing else; also found "
                              f"{sorted(set(data) - {'textual_inversion'})}")
        ti = from_dict(TextualInversionConfig, data["textual_inversion"], where="textual_inversion")
        return _train_embedding(ti, getattr(args, "device", "cpu"), args.quiet)
    cfg = load(DiffusionTrainConfig, args.config, args.overrides)
    _check_device(cfg.device, "device=")
    out = train_diffusion(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    last = out["history"][-1] if out["history"] else {}
    print(f"step {out['step']}" + (f", loss {last['loss']:.4f}" if last else "") + f"; run saved in {cfg.out_dir}")
    return 0


# --- openldm data -----------------------------------------------------------------------------------------------

def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["emoji"], help="the data set to fetch and build")
    p.add_argument("--root", default=None, help="where to build it (default: $OPENLDM_DATA/emoji, "
                                                 "~/.cache/openldm/emoji)")
    p.add_argument("--packages", default=None, help="folder of the npm tarballs (default: ROOT/packages; "
                                                     "missing ones are fetched with `npm pack`)")
    p.add_argument("--rebuild", action="store_true", help="build again even if the data set is built")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("data", "fetch and build a data set: emoji (openly licensed artwork from npm, captions from its metadata)",
         _data_args)
def cmd_data(args: argparse.Namespace) -> int:
    from openldm.data.emoji import build_emoji

    root = build_emoji(args.root, packages=args.packages, rebuild=args.rebuild, progress=not args.quiet)
    print(root)
    return 0


# --- openldm train-embedding ------------------------------------------------------------------------------------

def _train_embedding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file of a TextualInversionConfig (base_model, data, name, "
                                                  "out, num_vectors, init_text, template, size, steps, lr, ...)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. name=sksstyle steps=2000 num_vectors=4")


@command("train-embedding", "learn a textual-inversion embedding for a Stable Diffusion model from captioned images; "
                            "saved in A1111's layout", _train_embedding_args)
def cmd_train_embedding(args: argparse.Namespace) -> int:
    from openldm.config import load
    from openldm.training.textual_inversion import TextualInversionConfig

    return _train_embedding(load(TextualInversionConfig, args.config, args.overrides), args.device, args.quiet)


def _train_embedding(cfg, device: str, quiet: bool) -> int:
    from openldm.training.textual_inversion import train_embedding

    out = train_embedding(cfg, device=device, progress=not quiet)
    losses = out["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    print(f"{len(losses)} steps, mean loss of the last {len(tail)}: {sum(tail) / len(tail):.4f}; embedding "
          f"{cfg.name!r} saved as {out['out']}")
    return 0


# --- entry point ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openldm", description="Latent diffusion from scratch: train, sample, run SD v1 weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, add_args, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.set_defaults(_fn=fn, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        args._argv = argv[1:]  # the command's own arguments
        if extra:  # overrides may come anywhere on a training command line: argparse takes only their first run
            if getattr(args, "overrides", None) is None or any(a.startswith("-") for a in extra):
                getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides += extra
    except SystemExit as e:  # a bad command line (one line on stderr) or --help
        return int(e.code or 0)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    try:
        return int(args._fn(args) or 0)
    except (ConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError, TrainingDiverged) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"openldm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
