"""Two gloo processes under torchrun equal one process with the same global batch.

The tiny class-conditional run of test_diffusion_training (shapes at 16 px, global batch 8 in 2 accumulation steps,
6 AdamW steps) is trained once in this process and once by ``torchrun --standalone --nproc_per_node=2`` (2 samples
per rank and accumulation step). They agree up to float reduction order (half-batch means averaged by the
all-reduce, another thread count). Measured: logged losses and gradient norms within 1.3e-7 relative, every
weight within 1.5e-7 absolute (about one float32 ulp at 1; AdamW moves a weight ~1e-3 per step). Asserted:
1e-5 relative for losses and gradient norms, 1e-6 absolute + 1e-5 relative for weights. The gradient norm is the
check that gradients are averaged, not summed: AdamW and clipping would hide a factor of two in the weights.

The same holds for conditioners that draw randomness of their own: a low-res condition (noise level and noise
augmentation of the image shrunk 4 times) with an inpainting one (random masks), in place of the class label. Each
rank draws them for the whole micro-batch and keeps its rows. Measured: losses within 6e-8 relative, gradient norms
within 7.3e-8, weights within 3.1e-7 absolute; drawing for its own rows only (before this was fixed) gave other
draws than one process and moved the shared generator less: losses 1-4% apart from the first step, gradient norms
up to 26%, weights 1.1e-2."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_diffusion_training import tiny

from openldm.config import to_dict
from openldm.training.diffusion import train_diffusion

WORKER = Path(__file__).with_name("_ddp_worker.py")
TIMEOUT_S = 90


def _torchrun(config: Path, nproc: int) -> subprocess.CompletedProcess:
    """Launch the worker under torchrun in its own process group, killed whole if it outlives ``TIMEOUT_S``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the group this test started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _logged(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


SPATIAL = [{"kind": "low_res", "options": {"factor": 4, "embed_dim": 16}},
           {"kind": "inpaint", "options": {"latent_channels": 3}, "drop_prob": 0.2}]


@pytest.mark.parametrize("over", [{}, {"conditions": SPATIAL}], ids=["class_label", "low_res+inpaint"])
def test_two_gloo_processes_equal_one_process(tmp_path, over):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    history = train_diffusion(tiny(single_dir, grad_accum=2, **over), progress=False)["history"]

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny(ddp_dir, grad_accum=2, **over))))
    done = _torchrun(config, nproc=2)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "rank 0 done: step 6" in done.stdout and "rank 1 done: step 6" in done.stdout

    # logging on rank 0 only (one line per step) and of the global mean loss, not rank 0's half batch
    assert _logged(single_dir, "loss") == [h["loss"] for h in history]
    for key in ("loss", "grad_norm"):
        one, two = _logged(single_dir, key), _logged(ddp_dir, key)
        assert len(two) == len(one) == 6
        torch.testing.assert_close(torch.tensor(two, dtype=torch.float64), torch.tensor(one, dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=f"{key}: {two} != {one}")

    files = sorted(p.name for p in single_dir.iterdir())
    assert sorted(p.name for p in ddp_dir.iterdir()) == files
    for name in ("unet.safetensors", "unet_ema.safetensors", "conditioner.safetensors"):
        a, b = load_file(str(single_dir / name)), load_file(str(ddp_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
