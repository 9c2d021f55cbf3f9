"""The ``openldm`` command: one entry point, one typed function per subcommand.

Errors meant for the user (bad values, missing files) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from openldm.config import ConfigError

Command = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register a subcommand: the decorated function takes the parsed namespace; ``args`` adds its flags."""
    def deco(fn: Command) -> Command:
        _COMMANDS[name] = (fn, args or (lambda p: None), help)
        return fn
    return deco


# --- openldm models ---------------------------------------------------------------------------------------------

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default=None, help="only presets of this model kind (e.g. unet, autoencoder_kl)")


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


# --- openldm demo -----------------------------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 100], help="sampling step counts to compare")
    p.add_argument("--samples", type=int, default=8000, help="number of points drawn per sampler")
    p.add_argument("--seed", type=int, default=0, help="random seed")


@command("demo", "sample a known 2-D Gaussian mixture with every sampler and report how close each gets", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from openldm.evaluation.toy import mixture_report

    print(mixture_report(steps=args.steps, num_samples=args.samples, seed=args.seed))
    return 0


# --- openldm train ----------------------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file of a DiffusionTrainConfig (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=2000 optim.lr=3e-4 unet.model_channels=64")


@command("train", "train a (latent) diffusion model; conditions, data and UNet named in the config", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from openldm.config import load
    from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

    cfg = load(DiffusionTrainConfig, args.config, args.overrides)
    out = train_diffusion(cfg, resume=args.resume, progress=not args.quiet)
    last = out["history"][-1] if out["history"] else {}
    print(f"step {out['step']}" + (f", loss {last['loss']:.4f}" if last else "") + f"; run saved in {cfg.out_dir}")
    return 0


# --- entry point ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openldm", description="Latent diffusion from scratch: train, sample, run SD v1 weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, add_args, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    try:
        return int(args._fn(args) or 0)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"openldm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
