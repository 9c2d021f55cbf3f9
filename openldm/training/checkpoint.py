"""Training checkpoints, the one resume mechanism of the diffusion, autoencoder and CLIP loops.

What a loop resumes from besides its weight files is declared once, in :class:`LoopState`: the step, the data
position, every optimiser and LR schedule, the loss scaler, every explicit generator, every global RNG state and the
EMA's update count. :class:`Checkpoints` writes a checkpoint as a whole: the loop's weight files and the training
state go into ``checkpoints/.step_N.tmp/``, each file fsynced, with a ``manifest.json`` of their sizes and SHA-256;
the folder is renamed to ``checkpoints/step_N/`` and only then does ``checkpoints/latest`` (replaced atomically)
name it. A kill at any moment leaves the previous checkpoint as the latest, whole. The top-level files of the run
directory (what inference and users read) are then hard links to the latest checkpoint's files. Resuming verifies
the set (every file of the manifest, of its size and hash, one step) and falls back to the previous intact
checkpoint, saying so; leftovers of an interrupted write are removed on the next start. :func:`begin_run` is
what every loop calls first: it refuses to train over an existing run without ``overwrite``, to resume from
nothing, and to resume with a config that changed where it cannot change; it returns the checkpoint to load.

The training state is stored without pickle: every tensor of a nested state (optimiser state dicts, EMA weights, RNG
states) goes into a ``.safetensors`` file under a path-like key, and everything else into a JSON tree kept in the
same file's metadata, so loading never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from openldm.io.files import atomic_path
from openldm.io.run_dir import CHECKPOINTS, LATEST, STATE_FILE, latest_checkpoint, step_name
from openldm.training.common import TrainingDiverged

_TENSOR_TAG = "__tensor__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting tensors under path keys."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR_TAG: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"training state at {prefix!r} has non-string keys: {list(obj)[:5]}")
        # JSON keys are strings: remember which were ints (optimiser state is keyed by parameter index).
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        out = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a training state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_TAG in obj:
            return tensors[obj[_TENSOR_TAG]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write a nested training state (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"openldm.training_state": json.dumps(tree)})
    return path


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_state`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if "openldm.training_state" not in meta:
            raise ValueError(f"{str(path)!r} is not an openldm training-state file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(json.loads(meta["openldm.training_state"]), tensors)


def rng_state() -> dict[str, Any]:
    """Every global RNG state a training loop touches (Python, NumPy, torch CPU and CUDA)."""
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the state a loop resumes from ------------------------------------------------------------------------------

@dataclass
class LoopState:
    """Everything a training loop continues from besides its weight files. ``stream`` is the loop's
    :class:`~openldm.training.common.BatchStream` (its epoch and position are the data position)."""

    stream: Any
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None  # an EMA: its update count (its weights are among the weight files)

    def state_dict(self, step: int) -> dict[str, Any]:
        """The state after ``step`` steps."""
        return {"step": step, "epoch": self.stream.epoch, "position": self.stream.position,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "generators": {k: g.get_state() for k, g in self.generators.items()},
                "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else {},
                "ema_updates": None if self.ema is None else self.ema.num_updates,
                "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any], lrs: dict[str, float] | None = None) -> int:
        """Restore ``state`` and return its step; ``lrs`` (scheduler name -> the config's learning rate, which may
        have changed since) replace the saved base learning rates from this step on."""
        for name, parts in (("optimizers", self.optimizers), ("schedulers", self.schedulers),
                            ("generators", self.generators)):
            if set(state[name]) != set(parts):
                raise ValueError(f"the training state holds {name} {sorted(state[name])}, this loop has "
                                 f"{sorted(parts)}: it was written by another kind of run")
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
            lr = (lrs or {}).get(k)
            if lr is not None and any(b != lr for b in s.base_lrs):
                s.base_lrs = [lr] * len(s.base_lrs)
                for group, fn in zip(s.optimizer.param_groups, s.lr_lambdas):
                    group["initial_lr"], group["lr"] = lr, lr * fn(s.last_epoch)
                s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        if self.scaler is not None and self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.num_updates = int(state["ema_updates"])
        set_rng_state(state["rng"])
        self.stream.epoch, self.stream.position = int(state["epoch"]), int(state["position"])
        return int(state["step"])


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(weights)``, a mismatch (another run's shapes or parts) an error naming the file."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise ValueError(f"{str(path)!r} does not fit this run's model ({detail[:300]}); it belongs to another "
                         "run: resume with that run's config, or train into a new out_dir") from None


def check_finite(params: list[torch.Tensor], step: int, out_dir: Path, what: str = "weights") -> None:
    """The divergence guard's last check: after the update every weight is finite, else nothing is saved."""
    if params and not bool(torch.isfinite(torch.stack([p.detach().float().norm() for p in params])).all()):
        raise TrainingDiverged(f"the {what} became NaN/Inf at step {step}; training stopped, the last good "
                               f"checkpoint in {str(out_dir)!r} is untouched (lower the learning rate, or raise "
                               "optim.eps)")


def check_grad_norm(norm: torch.Tensor | float, step: int, out_dir: Path, scaler: torch.amp.GradScaler | None,
                    what: str = "gradient norm") -> None:
    """A non-finite gradient norm stops training (with an fp16 loss scaler an Inf norm only skips the step)."""
    if scaler is not None and scaler.is_enabled():
        return
    if not np.isfinite(float(norm)):
        raise TrainingDiverged(f"the {what} is {float(norm)} at step {step}; training stopped, the last good "
                               f"checkpoint in {str(out_dir)!r} is untouched (lower the learning rate)")


# ---- whole checkpoints -------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _discard(path: Path) -> None:
    """Delete a folder so that a kill midway leaves nothing under its name (a half-deleted checkpoint looks like
    a broken one): renamed to ``.NAME.old.tmp`` first, which the next start's clean-up removes if this cannot."""
    doomed = path.with_name(f".{path.name}.old.tmp")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


class Checkpoints:
    """The whole checkpoints of the run in ``out_dir`` (``checkpoints/step_N/``, ``checkpoints/latest``) trained
    with ``config`` (plain data, stored in each); the newest ``keep`` are kept."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.out_dir, self.config, self.keep = Path(out_dir), config, keep
        self.root = self.out_dir / CHECKPOINTS

    def steps(self) -> list[Path]:
        """The checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _step_of(p) is not None]
        return sorted(found, key=_step_of, reverse=True)

    def clean(self) -> None:
        """Remove what an interrupted write left: ``.tmp`` folders and files (here and at the top level)."""
        for folder in (self.root, self.out_dir):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def save(self, step: int, state: dict[str, Any], write_weights: Callable[[Path], None]) -> Path:
        """Write one checkpoint as a whole: ``write_weights(folder)`` writes the loop's weight files, then the
        training state (with the config) and the manifest; fsynced, renamed into place, then named ``latest``."""
        name = step_name(step)
        tmp = self.root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_weights(tmp)
        save_state({**state, "config": self.config}, tmp / STATE_FILE)
        files = sorted(p for p in tmp.iterdir() if p.is_file() and not p.name.startswith("."))
        manifest = {"step": step, "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for p in [*files, tmp / MANIFEST, tmp]:
            _fsync(p)
        final = self.root / name
        if final.exists():  # a step saved again (after a fall back past it): the old folder goes first
            _discard(final)
        os.replace(tmp, final)
        _fsync(self.root)
        with atomic_path(self.root / LATEST) as pointer:
            pointer.write_text(name + "\n")
            _fsync(pointer)
        _fsync(self.root)
        self.publish(final)
        for stale in self.steps()[self.keep:]:
            _discard(stale)
        return final

    def publish(self, folder: Path) -> None:
        """The top-level files of the run directory become links to ``folder``'s (copies where links fail)."""
        for p in sorted(folder.iterdir()):
            if p.name == MANIFEST or not p.is_file():
                continue
            with atomic_path(self.out_dir / p.name) as tmp:
                tmp.unlink()
                try:
                    os.link(p, tmp)
                except OSError:
                    shutil.copy2(p, tmp)

    def verify(self, folder: Path) -> str | None:
        """Why ``folder`` is not a whole checkpoint, or None when it is."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return f"its {MANIFEST} is unreadable ({type(e).__name__})"
        if manifest.get("step") != _step_of(folder) or STATE_FILE not in manifest.get("files", {}):
            return f"its {MANIFEST} does not describe step {_step_of(folder)}"
        for file, facts in manifest["files"].items():
            path = folder / file
            if not path.is_file():
                return f"{file} is missing"
            if path.stat().st_size != facts["bytes"] or _sha256(path) != facts["sha256"]:
                return f"{file} differs from what was written (size or SHA-256)"
        return None

    def find(self, repair: bool = True) -> Path | None:
        """The newest whole checkpoint (``latest`` first), falling back past broken ones with a warning (and, with
        ``repair``, the top-level files linked to the one found)."""
        latest = latest_checkpoint(self.out_dir)
        order = ([latest] if latest is not None else []) + [p for p in self.steps() if p != latest]
        broken = []
        for folder in order:
            reason = self.verify(folder)
            if reason is None:
                if broken:
                    print(f"warning: checkpoint {'; '.join(broken)}; resuming from {folder.name} instead",
                          file=sys.stderr)
                    if repair:
                        self.publish(folder)
                return folder
            broken.append(f"{folder.name} is not whole ({reason})")
        if broken:
            raise ValueError(f"no checkpoint in {str(self.root)!r} can be resumed: {'; '.join(broken)}; start "
                             "again with --overwrite")
        return None

    def holds_run(self) -> bool:
        """Whether ``out_dir`` holds a training run (checkpoints, a training state or logged steps)."""
        metrics = self.out_dir / "metrics.jsonl"
        return bool(self.steps()) or (self.out_dir / STATE_FILE).is_file() or \
            (metrics.is_file() and metrics.stat().st_size > 0)

    def remove_run(self) -> None:
        """``overwrite``: the previous run's checkpoints, logs, samples and top-level state go (caches stay)."""
        for name in (CHECKPOINTS, "samples", "snapshots", "tensorboard"):
            if (self.out_dir / name).is_dir():
                _discard(self.out_dir / name)
        for name in ("metrics.jsonl", STATE_FILE):
            (self.out_dir / name).unlink(missing_ok=True)


# ---- starting a loop --------------------------------------------------------------------------------------------

# Config keys a resumed run may change: applied from the resumed step on. Every other difference is refused.
RESUMABLE = ("steps", "log_every", "save_every", "keep_checkpoints", "sample_every", "snapshot_every", "eval_every",
             "num_workers", "device", "out_dir", "threads", "compile", "channels_last", "sample_steps",
             "sample_guidance", "num_sample_images", "scale_samples", "eval_pairs", "eval_data", "optim.lr",
             "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip",
             "disc_optim.lr", "disc_optim.schedule", "disc_optim.warmup_steps", "disc_optim.min_lr_ratio",
             "disc_optim.grad_clip")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def refused_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's config and this one where a resume cannot
    change them (every key outside :data:`RESUMABLE`)."""
    a, b = _flat(saved), _flat(now)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


@dataclass
class Start:
    """What :func:`begin_run` found: the checkpoints of the run and the one to resume (None: a fresh start) with
    its training state."""

    checkpoints: Checkpoints
    folder: Path | None = None
    state: dict[str, Any] | None = None


def begin_run(out_dir: str | Path, config: dict[str, Any], *, resume: bool | str, overwrite: bool = False,
              keep: int = 2, main: bool = True) -> Start:
    """Start or resume the run in ``out_dir`` with ``config`` (plain data). ``resume``: True (a checkpoint must
    exist), False (a fresh run: refused over an existing one unless ``overwrite``), or "auto" (resume when a
    checkpoint exists). Only the ``main`` process cleans, deletes and rewrites files."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    out_dir = Path(out_dir)
    ckpts = Checkpoints(out_dir, config, keep)
    if main:
        ckpts.clean()
    if not resume:
        if ckpts.holds_run():
            if not overwrite:
                raise FileExistsError(
                    f"{str(out_dir)!r} already holds a training run; continue it with --resume, or start over with "
                    "--overwrite (its checkpoints and metrics are deleted), or choose another out_dir")
            if main:
                ckpts.remove_run()
        return Start(ckpts)
    folder = ckpts.find(repair=main)
    if folder is None:
        if resume == "auto":
            if main:
                ckpts.remove_run()
            return Start(ckpts)
        legacy = (out_dir / STATE_FILE).is_file()
        raise FileNotFoundError(
            f"nothing to resume in {str(out_dir)!r}: " + (
                f"its {STATE_FILE} predates whole checkpoints (checkpoints/) and cannot be verified; train again "
                "with --overwrite" if legacy else "no checkpoint has been saved there; start without --resume"))
    state = load_state(folder / STATE_FILE)
    refused = refused_changes(state.get("config", {}), config)
    if refused:
        saved, now = _flat(state.get("config", {})), _flat(config)
        what = ", ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in refused[:6])
        raise ValueError(f"--resume: the config of {str(out_dir)!r} changed where a resumed run cannot ({what}); "
                         f"architecture, data, batch size and seed stay as trained (a resume may change: steps, "
                         "learning rate and schedule, log/save/sample intervals, device); train into a new out_dir")
    if main:
        keep_metrics_until(out_dir / "metrics.jsonl", int(state["step"]))
    return Start(ckpts, folder, state)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the logged records after ``step`` (and a line a kill cut short): each step is logged once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
