import math

import pytest
import torch

from openldm.training.distributed import DistInfo, ShardedSampler
from openldm.training.optim import OptimConfig, lr_factor, make_optimizer


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, OptimConfig(lr=1.0), 10) == 1.0


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_optimizer([p], OptimConfig(lr=0.5, warmup_steps=4), total_steps=10)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sched.step()
    assert lrs == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_bad_schedule_named():
    with pytest.raises(ValueError, match="'linear'"):
        OptimConfig(schedule="linear")


def test_shards_partition_the_global_order():
    one = ShardedSampler(103, seed=3)
    shards = [list(ShardedSampler(103, seed=3, info=DistInfo(r, 4))) for r in range(4)]
    order = one.global_order()
    # interleaving the shards rebuilds the single-process order (minus the remainder)
    rebuilt = [shards[i % 4][i // 4] for i in range(4 * len(shards[0]))]
    assert rebuilt == order[: len(rebuilt)]
    assert len(set(sum(shards, []))) == sum(len(s) for s in shards) == 100
    one.start = 50
    assert list(one) == order[50:]
    one.epoch = 1
    assert one.global_order() != order
