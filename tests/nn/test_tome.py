"""Token merging (ToMe for SD, Bolya & Hoffman 2023): the bipartite soft matching worked by hand on four tokens;
merge-then-unmerge is lossless when the merged tokens are identical; one destination per 2x2 cell; ratio 0 is the
plain network; self-attention sees N - r tokens only at the levels asked for; a small ratio stays close to the plain
UNet and a larger one drifts further; the setting is per call and per thread; a compiled UNet is one graph with
merging and one without; requests, PNG parameters and the CLI carry it to the bundled model (whose top
level has no attention, so the default level changes nothing)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from model_testing import randomize
from torch.nn import functional as F

from openldm.cli import main
from openldm.models.unet import UNet, UNetConfig
from openldm.nn.tome import TokenMerging, TokenMergingNet, active_merging, bipartite_soft_matching, cell_picks
from openldm.nn.transformer import TransformerBlock
from openldm.pipelines import read_png_params
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_four_tokens_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2]])[None]  # a 2x2 grid, (1, 4, 2)
    plan = bipartite_soft_matching(t, 2, 2, r=1)  # no generator: the cell's top-left token is the destination
    assert plan.dst.tolist() == [0] and plan.merged.tolist() == [[1]] and plan.kept.tolist() == [[2, 3]]
    merged = plan.merge(t)
    # token 1 is the most similar to token 0 and is averaged into it; 2 and 3 stay (most similar first)
    torch.testing.assert_close(merged, torch.stack([t[0, 2], t[0, 3], (t[0, 0] + t[0, 1]) / 2])[None])
    y = torch.arange(6.0).view(1, 3, 2)
    torch.testing.assert_close(plan.unmerge(y), torch.stack([y[0, 2], y[0, 2], y[0, 0], y[0, 1]])[None])


def test_one_destination_per_cell_drawn_reproducibly():
    x = torch.randn(2, 8 * 6, 5)
    plans = [bipartite_soft_matching(x, 8, 6, r=10, seed=torch.tensor(s), salt=salt) for s, salt in
             [(0, 0), (0, 0), (1, 0), (0, 1)]]
    assert torch.equal(plans[0].dst, plans[1].dst), "the same seed and salt draw the same destinations"
    assert not torch.equal(plans[0].dst, plans[2].dst) and not torch.equal(plans[0].dst, plans[3].dst)
    rows, cols = plans[0].dst // 6, plans[0].dst % 6
    cells = sorted(zip((rows // 2).tolist(), (cols // 2).tolist()))
    assert cells == [(i, j) for i in range(4) for j in range(3)], "exactly one destination in every 2x2 cell"
    assert plans[0].merge(x).shape == (2, 48 - 10, 5) and plans[0].unmerge(plans[0].merge(x)).shape == x.shape


def test_cell_picks_are_uniform_and_independent_of_the_salt():
    """Each cell's pick is uniform over the 4 cells of a 2x2 stride (chi-square over 40,000 cells, 3 degrees of
    freedom: 16.3 is its 0.1% tail), and the picks of two salts agree only by chance (1 in 4)."""
    picks = cell_picks(torch.tensor(12345), 0, 40_000, 4)
    counts = torch.bincount(picks, minlength=4).double()
    assert picks.min() >= 0 and picks.max() <= 3
    assert ((counts - 10_000) ** 2 / 10_000).sum() < 16.3, counts
    agree = (picks == cell_picks(torch.tensor(12345), 1, 40_000, 4)).double().mean()
    assert abs(agree - 0.25) < 0.01, agree
    torch._dynamo.reset()
    inductor = torch.compile(cell_picks)  # compiled C++ integer arithmetic: the same draws to the bit
    for seed in (0, 12345, 2**31 - 2):
        assert torch.equal(inductor(torch.tensor(seed), 5, 4096, 4), cell_picks(torch.tensor(seed), 5, 4096, 4))
    torch._dynamo.reset()


@pytest.mark.parametrize("r", [12, 25, 36])
def test_merge_then_unmerge_is_lossless_for_identical_tokens(r):
    g = torch.Generator().manual_seed(0)
    H, W = 8, 6
    cell_tokens = torch.randint(-8, 9, (2, H // 2, W // 2, 7), generator=g).float()  # integers: exact means
    x = cell_tokens.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, H * W, 7)  # each 2x2 cell identical
    plan = bipartite_soft_matching(x, H, W, r=r, seed=torch.tensor(3))
    assert torch.equal(plan.unmerge(plan.merge(x)), x)
    noisy = x + 0.5 * torch.randn(x.shape, generator=g)
    assert not torch.equal(plan.unmerge(plan.merge(noisy)), noisy), "merging does lose the differences"


CONFIG = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(0, 1), num_heads=2, context_dim=12, norm_groups=8)


@pytest.fixture(scope="module")
def unet():
    return randomize(UNet(CONFIG)).eval()


def smooth_input(seed: int = 0, B: int = 2, H: int = 16, W: int = 16):
    """A smooth latent (bilinear upsampling of a coarse one), where neighbouring tokens are alike, as in images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(B, 4, H // 4, W // 4, generator=g)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False), torch.randn(B, 5, 12, generator=g)


@torch.no_grad()
def test_ratio_zero_is_the_plain_network_exactly(unet):
    x, context = smooth_input()
    assert torch.equal(TokenMergingNet(unet, 0.0)(x, 500.0, context=context), unet(x, 500.0, context=context))
    assert torch.equal(TokenMergingNet(unet, 0.5, max_downsample=1)(x, 500.0, context=context),
                       TokenMergingNet(unet, 0.5, max_downsample=1)(x, 500.0, context=context)), "reproducible"


@torch.no_grad()
def test_self_attention_sees_fewer_tokens_only_at_the_levels_asked_for(unet):
    x, context = smooth_input()
    seen = {}
    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]

    def record(key):
        return lambda module, args, out: seen.setdefault(key, []).append(args[0].shape[1])  # tokens attending

    hooks = [b.self_attn.register_forward_hook(record(i)) for i, b in enumerate(blocks)]
    hooks += [b.cross_attn.register_forward_hook(record("cross")) for b in blocks]
    try:
        for max_downsample in (1, 2):
            seen.clear()
            TokenMergingNet(unet, 0.5, max_downsample)(x, 500.0, context=context)
            top = [seen[i][0] for i, b in enumerate(blocks) if seen[i][0] in (256, 128)]
            low = [seen[i][0] for i, b in enumerate(blocks) if seen[i][0] in (64, 32)]
            assert top and all(n == 128 for n in top), "256 tokens at the top level, half merged"
            assert low and all(n == (32 if max_downsample == 2 else 64) for n in low)
            assert set(seen["cross"]) == {256, 64}, "cross-attention always sees every token"
    finally:
        for h in hooks:
            h.remove()
    assert active_merging() is None, "the setting ends with the call"


@torch.no_grad()
def test_a_small_ratio_stays_close_to_the_plain_unet(unet):
    x, context = smooth_input()
    plain = unet(x, 500.0, context=context)
    another_input = float((unet(smooth_input(1)[0], 500.0, context=context) - plain).norm() / plain.norm())  # ~1.2
    errors = []
    for ratio in (0.1, 0.3, 0.6):
        out = TokenMergingNet(unet, ratio, max_downsample=1)(x, 500.0, context=context)
        errors.append(float((out - plain).norm() / plain.norm()))
    # measured on these random weights: 4 %, 9 %, 14 % relative error (7 %, 14 %, 22 % merging both levels)
    assert 0 < errors[0] < 0.06 and errors[0] < 0.05 * another_input, errors
    assert errors[0] < errors[1] < errors[2], f"more merging, further from the plain output: {errors}"


def test_the_setting_is_per_thread():
    inside, other = [], []
    token_merging = TokenMergingNet(torch.nn.Identity(), 0.5)

    class Probe(torch.nn.Module):
        def forward(self, x):
            inside.append(active_merging())
            worker = threading.Thread(target=lambda: other.append(active_merging()))
            worker.start()
            worker.join()
            return x

    token_merging.net = Probe()
    token_merging(torch.zeros(1, 4, 8, 8))
    assert isinstance(inside[0], TokenMerging) and inside[0].size == (8, 8) and other == [None]


@torch.no_grad()
def test_compiled_unet_is_one_graph_with_merging_and_one_without(unet):
    """Without merging the UNet traces to a single graph (fullgraph=True raises at any graph break); merging traces
    to a single graph too (the plan's shapes follow from the setting, its draws are tensor arithmetic), compiled
    once whatever each call's seed, gives eager's values, and leaves the plain graph in use after it."""
    torch._dynamo.reset()
    x, context = smooth_input()
    whole = torch.compile(unet, backend="eager", fullgraph=True)
    # traced, the feed-forward's matmuls are split (openldm.nn.transformer): the same values to rounding
    torch.testing.assert_close(whole(x, 500.0, context=context), unet(x, 500.0, context=context))
    torch.testing.assert_close(TokenMergingNet(whole, 0.5, seed=3)(x, 500.0, context=context),
                               TokenMergingNet(unet, 0.5, seed=3)(x, 500.0, context=context))
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(unet, backend=backend)
    compiled(x, 500.0, context=context)
    assert len(graphs) == 1
    merged_eager, merged_compiled = TokenMergingNet(unet, 0.5, seed=3), TokenMergingNet(compiled, 0.5, seed=3)
    outputs = []
    for _ in range(3):  # a new seed each call
        outputs.append(merged_eager(x, 500.0, context=context))
        torch.testing.assert_close(merged_compiled(x, 500.0, context=context), outputs[-1])
    assert len(graphs) == 2, "merging compiled once, not once a call"
    assert not torch.equal(outputs[0], outputs[1]), "each call draws its own destinations"
    assert not torch.equal(outputs[0], unet(x, 500.0, context=context))
    torch.testing.assert_close(compiled(x, 500.0, context=context), unet(x, 500.0, context=context))
    assert len(graphs) == 2, "the plain call recompiled after merging"
    torch._dynamo.reset()


@pytest.mark.parametrize("ratio, max_downsample", [(-0.1, 1), (1.0, 1), (True, 1), (0.5, 0), (0.5, 1.5)])
def test_bad_settings_are_value_errors(ratio, max_downsample):
    with pytest.raises(ValueError, match="token merging"):
        TokenMergingNet(torch.nn.Identity(), ratio, max_downsample)


@pytest.fixture(scope="module")
def bundled():
    return load_generator()


def _pixels(result):
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


def test_on_the_bundled_model_through_the_request(bundled):
    base = {"class_label": 7, "steps": 12, "seed": 3, "num_images": 2}
    plain = _pixels(bundled.generate(GenerationRequest(**base)))
    # the bundled UNet has no attention at its top level (attention_levels (1, 2)): merging there changes nothing
    top_only = _pixels(bundled.generate(GenerationRequest(**base, token_merging_ratio=0.5)))
    assert np.array_equal(top_only, plain)
    merged = bundled.generate(GenerationRequest(**base, token_merging_ratio=0.5, token_merging_max_downsample=2))
    other = _pixels(bundled.generate(GenerationRequest(**{**base, "seed": 4})))
    assert 0 < np.abs(_pixels(merged) - plain).mean() < 0.5 * np.abs(other - plain).mean()
    text = merged.params[0].to_text()
    assert "Token merging ratio: 0.5" in text and "Token merging max downsample: 2" in text
    back = GenerationParams.from_text(text)
    assert (back.token_merging_ratio, back.token_merging_max_downsample) == (0.5, 2)
    with pytest.raises(RequestError) as e:
        bundled.generate(GenerationRequest(**base, token_merging_ratio=1.5))
    assert e.value.field == "token_merging_ratio"


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--class-label", "2", "--steps", "3", "--tome", "0.4", "--tome-max-downsample", "2",
                 "--out", str(out), "--quiet"]) == 0
    params = read_png_params(out)
    assert (params.token_merging_ratio, params.token_merging_max_downsample) == (0.4, 2)
    assert main(["generate", "--class-label", "2", "--tome", "1.5", "--out", str(out), "--quiet"]) == 2
    assert "token merging ratio 1.5" in capsys.readouterr().err
