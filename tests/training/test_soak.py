"""kill -9 soak: ``openldm train`` on a tiny config, killed with SIGKILL at random moments (many of them inside
checkpoint writes: ``save_every=1``) and restarted (``--resume`` when ``checkpoints/latest`` exists, else
``--overwrite``) until it completes. After every kill each file of the run directory loads (weights through
openldm's loaders, JSON, metrics lines, every checkpoint folder verifies, and the run loads for inference); a start
leaves none of the ``.tmp`` files an earlier kill left; the finished run is bit-identical to an uninterrupted one
(weights, training state, each step's logged loss) and logged each step once.

Starting python + torch costs seconds on a busy machine, so the default variant forks its training processes from
a "zygote" process that has already imported openldm and torch (each fork runs ``openldm.cli.main(["train",
...])``, exactly what ``python -m openldm.cli train`` runs); the uninterrupted reference is a plain
``python -m openldm.cli train`` subprocess. The slow variant starts every process that way.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from openldm.io.native import load_model
from openldm.io.run_dir import CHECKPOINTS, LATEST, is_run_dir, read_config
from openldm.pipelines.trained import load_run
from openldm.training.checkpoint import Checkpoints, load_state

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
BAR = b"train:"  # tqdm's bar appears once begin_run, the model build and the resume load are done

# Forks `openldm train` processes on request, reaps them (so their pids are never reused while it holds them)
# and kills them on request. Lines in: {"argv": [...], "log": path}, "kill"; lines out: {"pid"}, {"status"}. Its
# stdin is read unbuffered, so select() sees every line not yet read; a "kill" that comes after the exit is ignored;
# at the end of its input it kills the process it runs and leaves.
ZYGOTE = r"""
import json, os, select, signal, sys
stdin = os.fdopen(0, "rb", buffering=0)
import torch
torch.set_num_threads(1)
import openldm.cli, openldm.training.diffusion, openldm.pipelines.trained
try:
    import torch.utils.tensorboard
except ImportError:
    pass
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimiser imports torch._dynamo (seconds)
assert len(os.listdir("/proc/self/task")) == 1  # one thread: safe to fork
print(json.dumps({"ready": True}), flush=True)
while line := stdin.readline():
    if line.strip() == b"kill":
        continue
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = openldm.cli.main(req["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    print(json.dumps({"pid": pid}), flush=True)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if select.select([stdin], [], [], 0.005)[0] and stdin.readline().strip() in (b"kill", b""):  # b"": EOF
            os.kill(pid, signal.SIGKILL)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def write_config(path: Path, out_dir: Path, steps: int, save_every: int) -> Path:
    """The tiny class-conditional pixel-space run of tests/training/test_diffusion_training.py, as YAML, with
    dropout: it draws from the global torch RNG, which a resume must restore and leave alone."""
    config = {
        "data": {"name": "shapes", "options": {"size": 16, "num_samples": 64}},
        "unet_preset": "tiny-unet", "unet": {"model_channels": 16, "norm_groups": 4, "dropout": 0.1},  # (global RNG)
        "conditions": [{"kind": "class_label", "options": {"num_classes": 8, "dim": 16}, "drop_prob": 0.2}],
        "schedule": {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "batch_size": 8, "steps": steps, "log_every": 1, "save_every": save_every, "optim": {"lr": 1e-3},
        "out_dir": str(out_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Process:
    """One training process: ``alive()``, ``kill()`` (SIGKILL), ``wait()`` -> exit status, ``log``."""

    def alive(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def wait(self) -> int:
        raise NotImplementedError


class Plain(Process):
    """``python -m openldm.cli train ...`` as a subprocess."""

    def __init__(self, argv: list[str], log: Path):
        self.log, self.file = log, open(log, "wb")  # noqa: SIM115 (closed by wait)
        self.proc = subprocess.Popen([sys.executable, "-m", "openldm.cli", *argv], cwd=REPO, env=ENV,
                                     stdout=self.file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        code = self.proc.wait()
        self.file.close()
        return code


class Zygote:
    """A python that has imported openldm and torch once, forking training processes from it (its pipes
    unbuffered, so select() on them sees every line not yet read)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        assert self.read() == {"ready": True}

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")

    def read(self) -> dict:
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path) -> Process:
        self.send(json.dumps({"argv": argv, "log": str(log)}))
        return Forked(self, self.read()["pid"], log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Forked(Process):
    """A training process the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int, log: Path):
        self.zygote, self.pid, self.log, self.status = zygote, pid, log, None

    def alive(self) -> bool:
        if self.status is None and select.select([self.zygote.proc.stdout], [], [], 0)[0]:
            self.status = self.zygote.read()["status"]
        return self.status is None

    def kill(self) -> None:
        if self.alive():
            self.zygote.send("kill")

    def wait(self) -> int:
        if self.status is None:
            self.status = self.zygote.read()["status"]
        return self.status


def training(proc: Process) -> bool:
    """Whether the process has reached its training loop (its progress bar is out)."""
    try:
        return BAR in proc.log.read_bytes()
    except FileNotFoundError:
        return False


def logged_steps(run: Path) -> int:
    """How many lines metrics.jsonl holds (one a step: log_every=1)."""
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def tmp_entries(run: Path) -> dict[Path, int]:
    """Every ``.tmp`` file or folder in the run directory -> its mtime (ns)."""
    out = {}
    for p in run.rglob("*.tmp"):
        try:
            out[p] = p.stat().st_mtime_ns
        except FileNotFoundError:
            pass
    return out


def check_loads(run: Path) -> list[str]:
    """Each file of the run directory that should load, loaded as its readers do; the problems found."""
    problems = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or rel.parts[0] == "tensorboard" or any(part.endswith(".tmp") for part in rel.parts):
            continue
        try:
            if p.name.startswith("unet") and p.suffix == ".safetensors":
                load_model(p)
            elif p.name == "training_state.safetensors":
                load_state(p)
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.name == "config.yaml":
                read_config(run)
            elif p.name == "metrics.jsonl":
                for n, line in enumerate(p.read_text().splitlines(), 1):
                    rec = json.loads(line)
                    assert isinstance(rec, dict) and isinstance(rec["step"], int), f"line {n}: {line!r}"
            elif rel == Path(CHECKPOINTS, LATEST):
                assert (p.parent / p.read_text().strip()).is_dir(), f"names {p.read_text()!r}"
            else:
                problems.append(f"{rel}: unexpected file")
        except Exception as e:  # noqa: BLE001 (every failure is a finding, named)
            problems.append(f"{rel}: {type(e).__name__}: {e}")
    checkpoints = Checkpoints(run, {})
    for folder in checkpoints.steps():
        reason = checkpoints.verify(folder)
        if reason is not None:
            problems.append(f"{folder.relative_to(run)} is not whole: {reason}")
    if is_run_dir(run):
        try:
            load_run(run)
        except Exception as e:  # noqa: BLE001
            problems.append(f"load_run: {type(e).__name__}: {e}")
    return problems


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path, steps: int) -> None:
    """``run`` ended bit-identical to ``ref``: every weight and training-state tensor, every logged number but the
    speed, each step logged once."""
    for name in ("unet.safetensors", "unet_ema.safetensors", "conditioner.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def same(x, y, where: str) -> None:
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}.{i}")
        else:
            assert x == y, where

    a, b = load_state(run / "training_state.safetensors"), load_state(ref / "training_state.safetensors")
    a.pop("config"), b.pop("config")  # (their out_dir differs)
    for state in (a, b):  # Python's and NumPy's global RNGs: seeded by the OS at start-up, unused by the loop
        del state["rng"]["python"], state["rng"]["numpy"]
    same(a, b, "training_state")
    got, want = metrics(run), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for r, s in zip(got, want):
        assert {k: v for k, v in r.items() if k != "images_per_s"} == {k: v for k, v in s.items()
                                                                       if k != "images_per_s"}, r["step"]


@dataclass
class Soak:
    """What a soak did."""

    kills: int = 0  # SIGKILLs that hit a running training loop
    mid_write: int = 0  # of those, kills that left a checkpoint or top-level write unfinished (.tmp present)
    early: int = 0  # SIGKILLs before the loop (start-up, cleaning, resume loading); not counted as kills
    starts: int = 0
    resumed_from: list[int] = field(default_factory=list)


def soak(tmp_path: Path, *, kills: int, steps: int, save_every: int, seed: int, forked: bool) -> Soak:
    """Run the reference, then the killed run until it completes; check everything after each kill."""
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_config = write_config(tmp_path / "ref.yaml", ref, steps, save_every)
    config = write_config(tmp_path / "run.yaml", run, steps, save_every)

    t0 = time.monotonic()
    proc = Plain(["train", "--config", str(ref_config)], logs / "ref.log")
    while not training(proc) and proc.alive():
        time.sleep(0.01)
    t_bar = time.monotonic()
    assert proc.wait() == 0, proc.log.read_text()[-2000:]
    step_time = (time.monotonic() - t_bar) / steps  # a first estimate; then measured as the run logs its steps
    t_ref = time.monotonic() - t0
    setup = 1.0 if forked else t_bar - t0  # time from a start to its loop: likewise

    zygote = Zygote() if forked else None
    report = Soak()
    left: dict[Path, int] = {}  # the .tmp entries the last kill left
    try:
        while True:
            latest = run / CHECKPOINTS / LATEST
            resume = latest.is_file()
            report.resumed_from.append(int(latest.read_text().strip()[5:]) if resume else 0)
            remaining = steps - report.resumed_from[-1]
            argv = ["train", "--config", str(config), "--resume" if resume else "--overwrite"]
            log = logs / f"start_{report.starts:03d}.log"
            started = time.monotonic()
            proc = zygote.start(argv, log) if zygote is not None else Plain(argv, log)
            report.starts += 1
            # When to kill: at a random moment of start-up (before the loop: cleaning, resume loading), or once
            # `wait` more steps are logged, a random part of a step later (in that step's save or the next step).
            target, wait, hit = None, None, False
            if report.kills < kills:
                if rng.random() < 0.2:
                    target = started + rng.uniform(0, setup)
                else:
                    wait = rng.randint(0, min(2 * save_every, remaining - 1))
                    part = rng.uniform(0, 1 if wait < remaining - 1 else 0.5)  # the last step: early in it
            reached, logged, last_line = False, 0, None
            while proc.alive():
                if not reached and training(proc):
                    reached, last_line = True, time.monotonic()
                    setup = 0.7 * setup + 0.3 * (last_line - started)
                    stale = {p: m for p, m in tmp_entries(run).items() if p in left and m == left[p]}
                    assert not stale, f"start {report.starts} kept what the kill before it left: {sorted(stale)}"
                    logged = logged_steps(run)  # = the resumed step: begin_run has cut the lines after it
                if reached and logged_steps(run) > logged:
                    now = time.monotonic()
                    step_time = 0.7 * step_time + 0.3 * (now - last_line) if logged > report.resumed_from[-1] \
                        else step_time  # (the first step of a start includes warming up)
                    logged, last_line = logged_steps(run), now
                if reached and wait is not None and target is None and logged - report.resumed_from[-1] >= wait:
                    target = last_line + part * step_time
                if target is not None and time.monotonic() >= target:
                    hit = reached or training(proc)
                    proc.kill()
                    break
                time.sleep(0.005)
            code = proc.wait()
            if code == 0:
                break
            assert code == -signal.SIGKILL, f"start {report.starts} exited {code}: {log.read_text()[-3000:]}"
            left = tmp_entries(run)
            if hit:
                report.kills += 1
                report.mid_write += bool(left)
            else:
                report.early += 1
            problems = check_loads(run)
            assert not problems, f"after kill {report.kills + report.early}: {problems}"
    finally:
        if zygote is not None:
            zygote.close()
    assert not tmp_entries(run), "the finished run left .tmp files"
    assert not check_loads(run)
    assert_same_run(run, ref, steps)
    report_line = (f"soak: {report.kills} kills in the loop ({report.mid_write} inside a write), {report.early} "
                   f"before it, {report.starts} starts, resumed from steps {report.resumed_from}, "
                   f"{time.monotonic() - t0:.0f} s (the reference run {t_ref:.0f} s, {step_time:.2f} s a step)")
    print(report_line)
    return report


def test_kill_9_soak(tmp_path):
    """30 SIGKILLs at random moments of a 40-step run saving every step; forked starts (see the module doc)."""
    report = soak(tmp_path, kills=30, steps=40, save_every=1, seed=0, forked=True)
    assert report.kills == 30 and report.mid_write > 0


@pytest.mark.slow
def test_kill_9_soak_plain_processes(tmp_path):
    """More kills, every start a fresh `python -m openldm.cli train`, saving every 3rd step (killed runs redo
    steps and their logged lines are dropped)."""
    report = soak(tmp_path, kills=50, steps=100, save_every=3, seed=1, forked=False)
    assert report.kills == 50 and report.mid_write > 0
