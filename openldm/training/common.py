"""Pieces every training loop shares: the data spec, the stop flag, the divergence error, run-directory writers
(resolved config, JSONL metrics, image grids) and a resumable stream of batches."""
from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from openldm.config import PRECISIONS, DataSpec, to_dict  # noqa: F401  (re-exported)
from openldm.data.transforms import item_generator
from openldm.io.run_dir import write_config  # noqa: F401  (re-exported: every loop writes config.yaml through it)
from openldm.training.distributed import DistInfo, ShardedSampler


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm or weight became NaN or Inf; the last good checkpoint is left as it was."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and returns at the end of the current step."""

    def __init__(self) -> None:
        self.stop = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.stop = True

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` name (None for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``out_dir/metrics.jsonl``."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


class BatchStream:
    """Endless batches over epochs of a seeded permutation; ``epoch`` and ``position`` (items consumed in the
    current epoch) are the whole state, so a stream rebuilt with them continues where a saved one stopped."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 info: DistInfo | None = None, epoch: int = 0, position: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.info = info or DistInfo()
        self.sampler = ShardedSampler(len(dataset), seed, self.info)
        self.epoch, self.position = epoch, position
        self._it = self._batches()

    def _batches(self) -> Iterator[dict]:
        while True:
            self.sampler.epoch, self.sampler.start = self.epoch, self.position
            if hasattr(self.dataset, "set_epoch"):  # per-epoch random transforms (flips, crops, captions)
                self.dataset.set_epoch(self.epoch)
            # the loader's base seed (its workers' seeds) from (seed, epoch), not drawn from the global torch RNG:
            # a stream rebuilt on resume leaves that RNG (dropout draws from it) as the uninterrupted run does
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                num_workers=self.num_workers, drop_last=True,
                                generator=item_generator(self.sampler.seed, self.epoch, -1))
            for batch in loader:
                self.position += self.batch_size * self.info.world_size
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def __next__(self) -> dict:
        return next(self._it)

    def __iter__(self) -> BatchStream:
        return self
