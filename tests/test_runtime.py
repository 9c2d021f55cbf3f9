"""openldm.runtime: the allocator setting, measured by the page faults it saves (each case in its own process: the
setting is process-wide and cannot be undone)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import resource, sys, torch
from openldm.runtime import keep_freed_memory
applied = keep_freed_memory()
def churn():  # what a network call does to its activations: 2 x 40 MiB alive, then freed, five times
    for _ in range(5):
        xs = [torch.ones(10 << 20) for _ in range(2)]
        del xs
for _ in range(3):  # the first rounds grow the heap around the small allocations between blocks; then it is reused
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn_faults(keep: bool) -> tuple[bool, int]:
    env = {**os.environ, "OPENLDM_KEEP_FREED_MEMORY": "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc setting; Linux only")
def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    applied_off, faults_off = churn_faults(keep=False)
    applied_on, faults_on = churn_faults(keep=True)
    assert not applied_off and applied_on
    # 400 MiB of fresh pages without the setting (~100,000 faults of 4 KiB pages, 200 of 2 MiB), none to speak of
    # with it
    assert faults_off >= 100, faults_off
    assert faults_on < faults_off / 50, (faults_on, faults_off)
