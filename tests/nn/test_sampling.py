"""Up- and downsampling blocks: shapes, and bf16 nearest upsampling on a CPU computed in bf16 itself, to the bit the
float32 round trip it replaced (nearest only copies values), in either memory layout, and without a float32 copy."""
from __future__ import annotations

import pytest
import torch
from model_testing import randomize
from torch.nn import functional as F
from torch.profiler import profile

from openldm.nn.sampling import Downsample, Upsample


@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_bf16_upsample_is_the_float32_round_trip_exactly(channels_last):
    up = randomize(Upsample(8)).to(torch.bfloat16)
    x = torch.randn(2, 8, 5, 7).bfloat16()
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    for size in (None, (11, 13)):
        expected = up.conv(F.interpolate(x.float(), size=size, scale_factor=None if size else 2.0,
                                         mode="nearest").to(torch.bfloat16))
        with profile() as prof:
            got = up(x, size)
        assert got.shape == (2, 8, *(size or (10, 14)))
        assert torch.equal(got, expected)
        casts = [e for e in prof.events() if e.name == "aten::_to_copy"]
        assert not casts, "bf16 upsampling went through float32"


@pytest.mark.parametrize("asymmetric_pad", [False, True])
def test_downsample_halves(asymmetric_pad):
    assert Downsample(4, asymmetric_pad)(torch.randn(1, 4, 8, 6)).shape == (1, 4, 4, 3)
