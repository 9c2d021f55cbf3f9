"""GroupNorm32: float32 statistics for half-precision inputs, without a float32 copy of the activation."""
import pytest
import torch
from torch.nn import functional as F

from openldm.nn.norm import group_norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_inputs_match_a_float32_round_trip(dtype, channels_last):
    torch.manual_seed(0)
    norm = group_norm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 16, 16) * 30 + 100  # a large mean: float16/bf16 statistics would lose it
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    norm = norm.to(dtype)
    w, b = norm.weight.float(), norm.bias.float()
    reference = F.group_norm(x.to(dtype).float(), 32, w, b, 1e-6).to(dtype)
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * reference.float().abs().clamp(min=1)
    assert ((out.float() - reference.float()).abs() <= ulp).all()


def test_mismatched_weights_compute_in_float32_and_keep_the_input_dtype():
    torch.manual_seed(0)
    norm = group_norm(64)
    x = torch.randn(2, 64, 8, 8).to(torch.bfloat16)
    out = norm(x)  # float32 weights, bfloat16 input
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
    assert torch.equal(out, expected)
