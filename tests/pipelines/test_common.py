"""compile_modules / thaw_modules (--compile): frozen weights are constants of the compiled graph, so a change to
the weights is not seen until the module is recompiled live; live graphs read the weights at every call."""
from __future__ import annotations

import torch
from torch import nn

from openldm.pipelines.common import compile_modules, compile_networks, thaw_modules


class Scaled(nn.Module):
    """A linear map whose weight is computed from parameters alone (as SD's GroupNorm32 casts and LoRA-free layers
    reshape theirs): freezing folds that computation into a constant."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return torch.tanh(x @ (self.weight * self.scale).t())


@torch.no_grad()
def test_frozen_graphs_keep_their_weights_until_thawed_live_graphs_read_them():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(Scaled(), Scaled()).eval().requires_grad_(False)
    x = torch.randn(4, 8)
    eager = net(x)
    assert compile_modules(net, None, freeze=True) == "frozen weights"
    torch.testing.assert_close(net(x), eager)
    net[0].weight.mul_(2)  # what fusing a LoRA does to a weight, in place
    changed = nn.Sequential(*net)(x)  # the same layers, uncompiled
    assert not torch.allclose(changed, eager)
    torch.testing.assert_close(net(x), eager)  # the frozen graph still holds the old weight
    assert thaw_modules(net) == "live weights"
    torch.testing.assert_close(net(x), changed)
    net[0].weight.div_(2)
    torch.testing.assert_close(net(x), eager)  # a live graph reads the weights at each call
    torch._dynamo.reset()


def test_compile_networks_leaves_a_cpu_decoder_eager():
    """--compile on a CPU compiles the UNet only: inductor's decoder is slower there than the eager one."""
    unet, decoder = nn.Linear(4, 4), nn.Linear(4, 4)
    assert compile_networks(unet, decoder, freeze=False) == "live weights"
    assert unet._compiled_call_impl is not None and decoder._compiled_call_impl is None


@torch.no_grad()
def test_a_compiled_unet_runs_its_deepcache_passes_compiled():
    """compile_modules also compiles a module's ``compiled_methods``: a DeepCache run on a compiled UNet goes
    through compiled graphs (compile time is spent on its first full and first cheap call) and draws what the eager
    UNet draws."""
    from model_testing import randomize

    from openldm.models.deepcache import DeepCacheUNet
    from openldm.models.unet import UNet, UNetConfig
    from openldm.pipelines.common import compile_seconds

    torch._dynamo.reset()
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(0, 1), num_heads=2, context_dim=12, norm_groups=8)
    torch.manual_seed(0)
    unet = randomize(UNet(cfg)).eval().requires_grad_(False)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    eager = DeepCacheUNet(unet, 2)
    steps = [torch.full((2,), 500.0 - 100 * i) for i in range(3)]  # tensors, as the denoisers pass them
    expected = [eager(x * (1 + i / 10), t, context=context) for i, t in enumerate(steps)]  # full, cheap, full
    assert compile_modules(unet, freeze=True) == "frozen weights"
    compiled, seconds = DeepCacheUNet(unet, 2), []
    for i, t in enumerate(steps):
        before = compile_seconds()
        torch.testing.assert_close(compiled(x * (1 + i / 10), t, context=context), expected[i],
                                   rtol=1e-4, atol=1e-5)
        seconds.append(compile_seconds() - before)
    assert seconds[0] > 0 and seconds[1] > 0 and seconds[2] == 0, seconds  # each pass compiled once, then reused
    torch._dynamo.reset()
