"""SD's spatial transformer: against diffusers' Transformer2DModel, and its own invariants."""
from __future__ import annotations

import pytest
import torch
from model_testing import randomize
from torch.nn import functional as F

from openldm.nn.sequential import EmbedSequential, consumes
from openldm.nn.transformer import (
    GEGLUFeedForward,
    SpatialTransformer,
    TransformerBlock,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_keys(depth: int) -> dict[str, str]:
    """Our SpatialTransformer submodule names -> diffusers Transformer2DModel names (the UNet key map's subset)."""
    from openldm.io.keymaps.unet import _transformer
    return {ours: theirs for ours, (_, theirs) in _transformer(depth).items()}


@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_matches_diffusers_transformer2d(linear: bool):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    ours = randomize(SpatialTransformer(64, heads=4, head_dim=16, depth=2, context_dim=24, linear_projection=linear)).eval()
    ref = Transformer2DModel(4, 16, in_channels=64, num_layers=2, cross_attention_dim=24, norm_num_groups=32,
                             use_linear_projection=linear).eval()
    names = diffusers_keys(2)
    state = {}
    for key, tensor in ours.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"{names[module]}.{param}"] = tensor
    ref.load_state_dict(state, strict=True)

    x, ctx = torch.randn(2, 64, 6, 5), torch.randn(2, 9, 24)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=mask.float()).sample
        torch.testing.assert_close(ours(x, ctx, mask), expected, rtol=1e-4, atol=1e-5)


def test_starts_as_identity():
    block = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8)
    x = torch.randn(1, 32, 4, 4)
    assert torch.equal(block(x, torch.randn(1, 3, 8)), x)


def test_conv_and_linear_projections_compute_the_same():
    conv = randomize(SpatialTransformer(32, heads=2, head_dim=16, context_dim=8, linear_projection=False))
    linear = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8, linear_projection=True)
    linear.load_state_dict({k: v.reshape(linear.state_dict()[k].shape) for k, v in conv.state_dict().items()})
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 8)
    torch.testing.assert_close(conv(x, ctx), linear(x, ctx))
    assert conv.proj_in.weight.shape == (32, 32, 1, 1) and linear.proj_in.weight.shape == (32, 32)


def test_channels_last_input_gives_the_same_output():
    block = randomize(SpatialTransformer(32, heads=2, head_dim=16, context_dim=8))
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 3, 8)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last), ctx), block(x, ctx))


def test_no_context_means_no_cross_attention():
    block = TransformerBlock(16, heads=2, head_dim=8, context_dim=None)
    assert block.cross_attn is None and block.norm_cross is None
    randomize(block)(torch.randn(1, 5, 16))  # runs without a context


def test_geglu_value_first_gate_second():
    ff = randomize(GEGLUFeedForward(8, mult=2))
    x = torch.randn(3, 8)
    value, gate = ff.proj(x)[:, :16], ff.proj(x)[:, 16:]
    torch.testing.assert_close(ff(x), ff.out(value * F.gelu(gate)))


def test_geglu_compiled_splits_the_projection_and_keeps_adapter_hooks():
    """Traced by torch.compile the feed-forward runs its value and gate as two matmuls over the weight's halves
    (the same values, to rounding); a layer with a forward hook (a training LoRA adapter) keeps the one call."""
    ff = randomize(GEGLUFeedForward(8, mult=2)).eval()
    x = torch.randn(3, 8)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ff, backend=backend)(x), ff(x))
    assert sum("linear" in op for op in ops) == 3 and not any("chunk" in op for op in ops), ops
    seen = []
    ff.proj.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out)
    ops.clear()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ff, backend=backend)(x), ff(x))
    assert seen == [(3, 32), (3, 32)] and sum("linear" in op for op in ops) == 2, (seen, ops)
    torch._dynamo.reset()


def test_embed_sequential_hands_each_layer_what_it_declares():
    calls = []

    class Needs(torch.nn.Module):
        consumes = ("emb",)

        def forward(self, x, emb):
            calls.append("emb")
            return x + emb

    seq = EmbedSequential(Needs(), torch.nn.Identity(), SpatialTransformer(4, heads=1, head_dim=4, norm_groups=4))
    assert [consumes(m) for m in seq] == [("emb",), (), ("context", "context_mask")]
    out = seq(torch.zeros(1, 4, 2, 2), emb=torch.ones(1, 4, 1, 1), context=None, context_mask=None, unused=1)
    assert calls == ["emb"] and torch.equal(out, torch.ones(1, 4, 2, 2))
    with pytest.raises(TypeError, match="consumes"):
        seq(torch.zeros(1, 4, 2, 2), context=None, context_mask=None)
