"""Shared test helper: run a script under torchrun (imported by tests in several folders)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun(script: Path | str, *args: str, nproc: int = 2, timeout_s: int = 90) -> subprocess.CompletedProcess:
    """``script args`` (a file, or "-m" and a module) under torchrun (gloo, one thread each) in its own process group, killed whole if it
    outlives ``timeout_s``; stdout and stderr together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the group this call started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout_s} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)
