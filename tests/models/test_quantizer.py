"""Vector quantiser: nearest codes, loss terms, straight-through gradients, EMA codebook, dead-code restarts,
perplexity, on small constructed cases whose answers are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from openldm.models.autoencoder import VQAutoencoder, tiny_vq
from openldm.models.quantizer import VectorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def as_latents(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> (1, D, 1, N) latents, so position n holds vector n."""
    return vectors.t()[None, :, None, :].contiguous()


def quantizer_with(codebook: torch.Tensor, **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    with torch.no_grad():
        q.codebook.copy_(codebook)
    for name, value in VectorQuantizer.initial_statistics(codebook, q.ema).items():
        getattr(q, name).copy_(value)
    return q


CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_nearest_codes_and_loss_terms():
    q = quantizer_with(CODES, beta=0.25).eval()
    z = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7], [0.8, 0.9], [0.05, 0.05]])
    out = q(as_latents(z))
    assert out.indices.flatten().tolist() == [0, 1, 2, 3, 0]
    assert torch.equal(out.z_q[0, :, 0, :].t(), CODES[[0, 1, 2, 3, 0]])
    expected = (z - CODES[[0, 1, 2, 3, 0]]).pow(2).mean()
    torch.testing.assert_close(out.codebook_loss, expected)
    torch.testing.assert_close(out.commitment_loss, expected)
    torch.testing.assert_close(out.loss, 1.25 * expected)
    assert torch.equal(q.lookup(out.indices), out.z_q)


def test_gradients_straight_through_and_to_the_codebook():
    q = quantizer_with(CODES).eval()
    z = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7]], requires_grad=True)
    out = q(as_latents(z))
    (out.z_q * torch.arange(6.0).view(1, 2, 1, 3)).sum().backward()  # d/dz_q is the weight tensor
    torch.testing.assert_close(z.grad, torch.arange(6.0).view(2, 3).t())  # identity through the rounding
    assert q.codebook.grad is None  # z_q carries no gradient to the codebook ...
    out = q(as_latents(z))
    out.codebook_loss.backward()  # ... the codebook loss does
    assert q.codebook.grad[:3].abs().sum() > 0 and q.codebook.grad[3].abs().sum() == 0


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQAutoencoder(tiny_vq(channels=16, channel_mult=(1, 2), num_embeddings=16))
    x = torch.randn(2, 3, 16, 16)
    recon, _ = model(x)
    recon.pow(2).mean().backward()  # reconstruction only: no commitment term
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_ema_update_moves_codes_towards_the_means_of_their_vectors():
    decay = 0.9
    q = quantizer_with(CODES, ema=True, decay=decay).train()
    assert not q.codebook.requires_grad
    z = torch.tensor([[0.2, 0.1], [0.0, 0.3], [0.7, 0.0], [0.3, 0.8]])  # codes 0, 0, 1, 2; code 3 unused
    out = q(as_latents(z))
    assert out.indices.flatten().tolist() == [0, 0, 1, 2]
    assert out.codebook_loss == 0 and not out.codebook_loss.requires_grad
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])
    sums = torch.stack([z[0] + z[1], z[2], z[3], torch.zeros(2)])
    cluster = decay * 1.0 + (1 - decay) * counts  # statistics start at "each code seen once, at itself"
    embed_sum = decay * CODES + (1 - decay) * sums
    torch.testing.assert_close(q.cluster_size, cluster)
    torch.testing.assert_close(q.codebook.detach(), embed_sum / cluster[:, None])
    assert torch.equal(q.codebook[3].detach(), CODES[3])  # the unused code stays put
    # Repeated on the same batch, each used code converges on the mean of its vectors.
    for _ in range(200):
        q(as_latents(z))
    means = torch.stack([(z[0] + z[1]) / 2, z[2], z[3]])
    torch.testing.assert_close(q.codebook[:3].detach(), means, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.codebook[3].detach(), CODES[3])


def test_eval_mode_leaves_codebook_and_statistics_alone():
    q = quantizer_with(CODES, ema=True, dead_code_threshold=0.5).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(as_latents(torch.rand(10, 2)))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_on_batch_vectors(ema: bool):
    q = VectorQuantizer(8, 2, ema=ema, decay=0.5, dead_code_threshold=0.3).train()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g) * 0.01 + 5.0  # far from the U(-1/8, 1/8) codebook: one code takes all
    first = q(as_latents(z), generator=g)
    # After one step (decay 0.5): the winner's usage is 0.5 + 0.5 * 64, the other seven sit at 0.5 > 0.3.
    assert (first.indices == first.indices.flatten()[0]).all()
    winner = int(first.indices.flatten()[0])
    q(as_latents(z), generator=g)  # now the seven unused codes fall to 0.25 < 0.3 and restart on batch vectors
    dead = [k for k in range(8) if k != winner]
    for k in dead:
        assert (q.codebook[k].detach() - z).norm(dim=1).min() < 1e-6, f"code {k} was not moved onto a batch vector"
        assert q.cluster_size[k] == pytest.approx(0.3)
    if ema:  # statistics agree with the new codes
        torch.testing.assert_close(q.embed_sum[dead] / q.cluster_size[dead, None], q.codebook[dead].detach())
    # The restarted codes now compete for the cluster: usage spreads out.
    assert q(as_latents(z), generator=g).indices.unique().numel() > 1


def test_perplexity_counts_effectively_used_codes():
    q = quantizer_with(torch.eye(8)).eval()
    uniform4 = q(as_latents(torch.eye(8)[[0, 1, 2, 3] * 5])).perplexity
    single = q(as_latents(torch.eye(8)[[6] * 7])).perplexity
    skewed = q(as_latents(torch.eye(8)[[0, 0, 1, 2]])).perplexity  # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2
    torch.testing.assert_close(uniform4, torch.tensor(4.0))
    torch.testing.assert_close(single, torch.tensor(1.0))
    torch.testing.assert_close(skewed, torch.tensor(2.0 ** 1.5))
    assert math.isclose(q(as_latents(torch.eye(8))).perplexity.item(), 8.0, rel_tol=1e-5)


def test_single_process_group_gives_the_same_update(tmp_path):
    """The all-reduce / broadcast path under torch.distributed (one gloo process) changes nothing."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    z = as_latents(torch.randn(32, 2, generator=torch.Generator().manual_seed(1)) + 3.0)
    plain = VectorQuantizer(8, 2, ema=True, dead_code_threshold=0.3, decay=0.5).train()
    grouped = VectorQuantizer(8, 2, ema=True, dead_code_threshold=0.3, decay=0.5).train()
    grouped.load_state_dict(plain.state_dict())
    for _ in range(3):
        plain(z, generator=torch.Generator().manual_seed(2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for _ in range(3):
            grouped(z, generator=torch.Generator().manual_seed(2))
    finally:
        dist.destroy_process_group()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[k], v)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 2, decay=1.5)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        VectorQuantizer(8, 2, dead_code_threshold=-1)
    with pytest.raises(ValueError, match="3 channels"):
        VectorQuantizer(8, 3)(torch.randn(1, 2, 4, 4))
