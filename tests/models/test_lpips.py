"""LPIPS (Zhang et al. 2018), VGG16 v0.1: metric properties, weight loading in the published layouts, and an
independent functional re-computation of the formula as the numeric oracle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from openldm.models.lpips import LPIPS

# torchvision vgg16 `features` convolutions: index -> (out, in). Written out here, independently of the module.
TV_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}
POOL_AFTER = {2, 7, 14, 21}  # a 2x2 max pool follows the ReLU after these convs (features.4, 9, 16, 23)
TAP_AFTER = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}  # conv index whose ReLU is relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
HEAD_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model() -> LPIPS:
    return LPIPS.random(seed=0)


def _images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _torchvision_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's vgg16 keys and shapes (classifier weights as small stand-ins: the
    loader ignores them, and the real ones are 400 MB)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (out, inp) in TV_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(out, inp, 3, 3, generator=g) * (2 / (9 * out)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.01
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.randn(4, 4, generator=g)
        sd[f"classifier.{i}.bias"] = torch.randn(4, generator=g)
    return sd


def _heads_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random non-negative tensors under the keys and shapes of lpips/weights/v0.1/vgg.pth."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(HEAD_CHANNELS)}


def _oracle(vgg: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """LPIPS written out with functional ops straight from the two state dicts: (B,) distances, relu taps of x."""

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h, out = (img - SHIFT) / SCALE, []
        for i in TV_CONVS:
            h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if i in TAP_AFTER:
                out.append(h)
            if i in POOL_AFTER:
                h = F.max_pool2d(h, 2)
        return out

    total, fx_all = 0.0, taps(x)
    for k, (fx, fy) in enumerate(zip(fx_all, taps(y))):
        nx = fx / (torch.linalg.vector_norm(fx, dim=1, keepdim=True) + 1e-10)
        ny = fy / (torch.linalg.vector_norm(fy, dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].flatten()  # (C,)
        total = total + torch.einsum("bchw,c->bhw", (nx - ny) ** 2, w).mean(dim=(1, 2))
    return total, fx_all


def test_output_shapes(model):
    x, y = _images(3, size=48)
    assert model(x, y).shape == (3,)
    assert model.layer_distances(x, y).shape == (3, 5)
    torch.testing.assert_close(model.layer_distances(x, y).sum(1), model(x, y))


def test_identical_images_are_at_distance_zero(model):
    x, _ = _images(4)
    torch.testing.assert_close(model(x, x), torch.zeros(4), atol=1e-7, rtol=0)


def test_symmetric_and_non_negative(model):
    x, y = _images(6, seed=1)
    d_xy, d_yx = model(x, y), model(y, x)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    assert torch.all(d_xy > 0)
    assert torch.all(model.layer_distances(x, y) >= 0)


def test_frozen_but_gradients_reach_the_input(model):
    x, y = _images(2)
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert model.train() is model and not model.training  # a parent's .train() leaves it in eval mode


def test_bad_inputs_are_named(model):
    x, y = _images(1)
    with pytest.raises(ValueError, match=r"\(1, 3, 32, 32\) and \(1, 3, 16, 16\)"):
        model(x, y[..., :16, :16])
    with pytest.raises(ValueError, match=r"\(8, 8\) is too small.*>= 16"):
        model(x[..., :8, :8], y[..., :8, :8])


def test_state_dict_uses_the_published_key_names(model):
    expected = {f"features.{i}.{p}" for i in TV_CONVS for p in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    assert set(model.state_dict()) == expected


@pytest.mark.parametrize("vgg_ext, heads_ext", [(".pth", ".safetensors"), (".safetensors", ".pth")])
def test_from_files_loads_both_layouts_into_the_right_layers(tmp_path: Path, vgg_ext: str, heads_ext: str):
    vgg, heads = _torchvision_state_dict(1), _heads_state_dict(2)
    vgg_path, heads_path = tmp_path / f"vgg16{vgg_ext}", tmp_path / f"vgg{heads_ext}"
    for path, sd in ((vgg_path, vgg), (heads_path, heads)):
        save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
    m = LPIPS.from_files(vgg_path, heads_path)
    for i in TV_CONVS:
        assert torch.equal(m.features[i].weight, vgg[f"features.{i}.weight"])
        assert torch.equal(m.features[i].bias, vgg[f"features.{i}.bias"])
    for k in range(5):
        assert torch.equal(getattr(m, f"lin{k}").model[1].weight, heads[f"lin{k}.model.1.weight"])
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_numeric_oracle_functional_recomputation_and_hooked_taps():
    """Our module against the formula written out with F.conv2d on the same state dicts, and the activations
    hooked at features.3/8/15/22/29 against the oracle's relu1_2 ... relu5_3."""
    vgg, heads = _torchvision_state_dict(3), _heads_state_dict(4)
    m = LPIPS().load_vgg16(vgg).load_heads(heads)
    x, y = _images(2, size=40, seed=5)
    hooked: list[torch.Tensor] = []
    handles = [m.features[i].register_forward_hook(lambda mod, inp, out: hooked.append(out[:2]))
               for i in (3, 8, 15, 22, 29)]
    try:
        got = m(x, y)
    finally:
        for h in handles:
            h.remove()
    expected, taps_x = _oracle(vgg, heads, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert [tuple(t.shape) for t in hooked] == [(2, 64, 40, 40), (2, 128, 20, 20), (2, 256, 10, 10),
                                               (2, 512, 5, 5), (2, 512, 2, 2)]
    for a, b in zip(hooked, taps_x):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loads_the_lpips_module_layout():
    """The lpips package's own state dict names the trunk net.sliceK.N.* (N = torchvision's index)."""
    vgg = _torchvision_state_dict(6)
    slices = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
    lpips_layout = {}
    for key, v in vgg.items():
        if key.startswith("features."):
            i = int(key.split(".")[1])
            k = next(s for s, (lo, hi) in enumerate(slices, start=1) if lo <= i < hi)
            lpips_layout[key.replace("features.", f"net.slice{k}.")] = v
    m = LPIPS().load_vgg16(lpips_layout)
    assert all(torch.equal(m.features[i].weight, vgg[f"features.{i}.weight"]) for i in TV_CONVS)


def test_missing_files_are_named_with_where_to_get_them(tmp_path: Path):
    heads = tmp_path / "vgg.pth"
    torch.save(_heads_state_dict(0), heads)
    with pytest.raises(FileNotFoundError, match=r"VGG16 weights.*nowhere/vgg16\.pth.*vgg16-397923af\.pth"):
        LPIPS.from_files(tmp_path / "nowhere" / "vgg16.pth", heads)
    vgg = tmp_path / "vgg16.safetensors"
    save_file(_torchvision_state_dict(0), str(vgg))
    with pytest.raises(FileNotFoundError, match=r"calibration heads.*missing\.pth.*lpips/weights/v0\.1/vgg\.pth"):
        LPIPS.from_files(vgg, tmp_path / "missing.pth")


def test_wrong_keys_or_shapes_are_named():
    heads = _heads_state_dict(0)
    del heads["lin3.model.1.weight"]
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
        LPIPS().load_heads(heads)
    vgg = _torchvision_state_dict(0)
    vgg["features.5.weight"] = vgg["features.5.weight"][:, :32]
    with pytest.raises(ValueError, match=r"features\.5\.weight has shape \(128, 32, 3, 3\); expected \(128, 64, 3, "):
        LPIPS().load_vgg16(vgg)
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        LPIPS().load_vgg16(_heads_state_dict(0))  # the two files swapped


@pytest.mark.skipif(
    not os.environ.get("OPENLDM_LPIPS_HEADS"),
    reason="set OPENLDM_LPIPS_HEADS to the lpips wheel's lpips/weights/v0.1/vgg.pth to check the real heads",
)
def test_real_lpips_heads_file(tmp_path: Path):
    path = Path(os.environ["OPENLDM_LPIPS_HEADS"])
    vgg = tmp_path / "vgg16.safetensors"
    save_file(_torchvision_state_dict(0), str(vgg))
    m = LPIPS.from_files(vgg, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(m.heads[k].weight, raw[f"lin{k}.model.1.weight"])
        assert torch.all(m.heads[k].weight >= 0)
    # Published v0.1 VGG heads: per-layer weight sums 6.926, 8.858, 17.515, 51.521, 47.035.
    sums = [round(float(h.weight.sum()), 3) for h in m.heads]
    assert sums == [6.926, 8.858, 17.515, 51.521, 47.035]
    x, y = _images(2, seed=7)
    torch.testing.assert_close(m(x, y), _oracle(_torchvision_state_dict(0), raw, x, y)[0], rtol=1e-5, atol=1e-7)
