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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mismatched_weights_compute_in_float32_and_keep_the_input_dtype_and_layout(dtype, channels_last):
    """float32 weights, half input (bf16 autocast training): output and gradients as the float32 round trip's."""
    torch.manual_seed(0)
    norm = group_norm(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 8, 8) * 30 + 100  # a large mean, as above
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).to(dtype).requires_grad_()
    grad = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last if channels_last else
                                                     torch.contiguous_format)
    out = norm(x)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = (p.detach().clone().requires_grad_() for p in (norm.weight, norm.bias))
    reference = F.group_norm(x_ref.float(), 32, w_ref, b_ref, norm.eps).to(dtype)
    reference.backward(grad)
    ulp = torch.finfo(dtype).eps * reference.float().abs().clamp(min=1)
    assert ((out.float() - reference.float()).abs() <= ulp).all()
    assert x.grad.dtype == dtype and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-2)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(norm.bias.grad, b_ref.grad, rtol=1e-3, atol=1e-3)
