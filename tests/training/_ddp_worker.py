"""Run by torchrun from test_distributed_training.py: ``_ddp_worker.py CONFIG.yaml`` trains with that config.
Ranks other than 0 fail loudly if they try to write a checkpoint or call ``on_log``."""
import os
import sys

import torch

from openldm.config import load
from openldm.training import diffusion
from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion


def main() -> None:
    torch.set_num_threads(1)
    cfg = load(DiffusionTrainConfig, sys.argv[1], [])
    rank = int(os.environ["RANK"])

    def forbidden(*args, **kwargs):
        raise AssertionError(f"rank {rank} wrote a checkpoint or logged; only rank 0 may")

    if rank != 0:
        diffusion._save_run = forbidden
    out = train_diffusion(cfg, progress=False, on_log=None if rank == 0 else forbidden)
    assert not torch.distributed.is_initialized(), "train_diffusion left its process group"
    print(f"rank {rank} done: step {out['step']}, loss {out['history'][-1]['loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
