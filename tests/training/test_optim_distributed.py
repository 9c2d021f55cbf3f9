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


def _adamw_by_hand(p0, grads, lr, betas, eps, weight_decay):
    """AdamW (Loshchilov & Hutter) in float64: decoupled decay, bias-corrected moments."""
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_fused_or_op_by_op_is_adamw(fused):
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, fused=fused)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, generator=g)
    grads = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(5)]
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    groups = [{"params": [pa], "weight_decay": 0.1}, {"params": [pb], "weight_decay": 0.0}]  # as CLIP's are
    opt, _ = make_optimizer(groups, cfg, total_steps=5)
    assert bool(opt.defaults["fused"]) == fused
    for ga, gb in grads:
        pa.grad, pb.grad = ga.clone(), gb.clone()
        opt.step()
    expect_a = _adamw_by_hand(a, [ga for ga, _ in grads], 0.01, cfg.betas, cfg.eps, 0.1)
    expect_b = _adamw_by_hand(b, [gb for _, gb in grads], 0.01, cfg.betas, cfg.eps, 0.0)
    torch.testing.assert_close(pa.detach().double(), expect_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(pb.detach().double(), expect_b, rtol=0, atol=1e-6)


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
