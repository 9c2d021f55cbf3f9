"""LPIPS, the learned perceptual image patch similarity (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), VGG16 variant v0.1: the perceptual term of the autoencoder loss in
taming-transformers (Esser et al. 2021) and latent diffusion.

    d(x, y) = sum_l  mean_{h,w}  w_l . (f_l(x) - f_l(y))^2        (Zhang et al. 2018, eq. 1)

where f_l are VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (Simonyan & Zisserman 2015),
each normalised to unit length along channels, and w_l >= 0 are the learned per-channel "linear calibration"
weights (1x1 convolutions without bias). Inputs are first shifted and scaled by the constants of the v0.1 release.

Weights come from two local files, never from the network:
  - VGG16 ImageNet weights in torchvision's layout (``features.N.weight`` / ``features.N.bias``; torchvision's
    ``vgg16-397923af.pth``; the ``classifier.*`` keys are ignored);
  - the calibration heads of the ``lpips`` package, ``lpips/weights/v0.1/vgg.pth`` inside its wheel
    (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``, shapes (1, C_l, 1, 1)).
Parameter names here are those two layouts, so ``state_dict()`` saves back to them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# torchvision's VGG16 ("configuration D"): conv3x3 widths, "M" = 2x2 max pool. Indices in the resulting
# nn.Sequential are torchvision's, so its state dict keys (features.0.weight, features.2.weight, ...) map 1:1.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # feature indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = (64, 128, 256, 512, 512)

# Input scaling of the lpips package v0.1: (x - shift) / scale, for x in [-1, 1] (ImageNet statistics
# expressed in that range).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

VGG_SOURCE = (
    "Get torchvision's VGG16 ImageNet weights (torchvision.models.VGG16_Weights.IMAGENET1K_V1, the file "
    "vgg16-397923af.pth from https://download.pytorch.org/models/vgg16-397923af.pth), or any state dict with "
    "keys features.N.weight / features.N.bias; .pth or .safetensors."
)
HEADS_SOURCE = (
    "Get the LPIPS v0.1 VGG calibration heads from the lpips package: `pip download --no-deps lpips`, unzip the "
    "wheel and take lpips/weights/v0.1/vgg.pth (keys lin0.model.1.weight ... lin4.model.1.weight); "
    ".pth or .safetensors."
)


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (index 29; the last max pool is not needed)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)  # 30 layers, indices 0..29


class _CalibrationHead(nn.Module):
    """One linear calibration layer w_l: a 1x1 conv C_l -> 1 without bias. ``model.0`` is the lpips package's
    dropout slot, kept as an identity (it is inert at evaluation and a frozen metric should not be stochastic)
    so the parameter is named ``model.1.weight`` as in the published weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial feature vector by its L2 norm over channels (eps as in the lpips package).

    Computed in float32: in float16 the sum of squares of 512 VGG activations overflows and eps underflows.
    ``vector_norm`` has a zero gradient at a zero vector where ``sqrt(sum(f^2))`` would give NaN."""
    f32 = f.float()
    return (f32 / (torch.linalg.vector_norm(f32, dim=1, keepdim=True) + eps)).to(f.dtype)


def _read_state_dict(path: str | os.PathLike, what: str, source: str) -> dict[str, torch.Tensor]:
    """Load a tensor dict from .safetensors or a .pth/.pt file (``weights_only``: no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS needs the {what} file, but {str(path)!r} does not exist. {source}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        # map_location: the published heads were saved from CUDA tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state dict of tensors (got {type(state).__name__}). {source}")
    return dict(state)


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018) with the VGG16 backbone, frozen.

    ``LPIPS()`` has random weights (VGG convs Kaiming-normal like torchvision, heads uniform in [0, 1) so the
    distance stays non-negative): enough for tests. ``LPIPS.from_files(vgg_path, heads_path)`` loads the real
    weights. Parameters never require grad and the module stays in eval mode, but gradients flow to the inputs.
    Inputs: images (B, 3, H, W) in [-1, 1], H and W >= 16. Output: distances (B,).
    """

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        for k, c in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", _CalibrationHead(c))
        with torch.no_grad():
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                    nn.init.zeros_(m.bias)
            for head in self.heads:
                nn.init.uniform_(head.weight, 0.0, 1.0, generator=generator)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def random(cls, seed: int = 0) -> LPIPS:
        """Random-weight LPIPS, reproducible from ``seed`` (for tests and shape checks)."""
        return cls(generator=torch.Generator().manual_seed(seed))

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPS:
        """LPIPS with torchvision-format VGG16 weights and the lpips package's v0.1 VGG heads, both local files
        (.safetensors, or .pth read with ``torch.load(weights_only=True)``). A missing file raises
        FileNotFoundError naming it and where to get it."""
        vgg = _read_state_dict(vgg_path, "VGG16 weights", VGG_SOURCE)
        heads = _read_state_dict(heads_path, "LPIPS calibration heads", HEADS_SOURCE)
        model = cls()
        model.load_vgg16(vgg, source=str(vgg_path))
        model.load_heads(heads, source=str(heads_path))
        return model

    @property
    def heads(self) -> list[nn.Conv2d]:
        """The five 1x1 calibration convolutions, relu1_2 first."""
        return [getattr(self, f"lin{k}").model[1] for k in range(len(TAPS))]

    def load_vgg16(self, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict") -> LPIPS:
        """Copy VGG16 conv weights from torchvision's layout (``features.N.*``) or the lpips package's module
        layout (``net.sliceK.N.*``). Other keys (``classifier.*``, the heads) are ignored."""
        found: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
            if m:
                found[f"{m[1]}.{m[2]}"] = value
        self._copy_into(self.features, found, "features.", source, VGG_SOURCE)
        return self

    def load_heads(self, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict") -> LPIPS:
        """Copy the calibration heads ``linK.model.1.weight`` (K = 0..4, shape (1, C_K, 1, 1)). Other keys are
        ignored."""
        for k in range(len(TAPS)):
            prefix = f"lin{k}."
            found = {name[len(prefix) :]: v for name, v in state_dict.items() if name.startswith(prefix)}
            self._copy_into(getattr(self, f"lin{k}"), found, prefix, source, HEADS_SOURCE)
        return self

    @staticmethod
    def _copy_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str, source: str, hint: str) -> None:
        expected = dict(module.named_parameters())
        missing = [prefix + n for n in expected if n not in tensors]
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} LPIPS key(s): {', '.join(missing[:6])}"
                           f"{' ...' if len(missing) > 6 else ''}. {hint}")
        with torch.no_grad():
            for name, p in expected.items():
                t = tensors[name]
                if t.shape != p.shape:
                    raise ValueError(f"{source}: {prefix}{name} has shape {tuple(t.shape)}; expected {tuple(p.shape)}")
                p.copy_(t)

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode: a frozen metric (a parent's ``.train()`` must not change it)."""
        return super().train(False)

    def layer_distances(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-layer terms of the distance, (B, 5), relu1_2 first; ``forward`` is their sum."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS inputs have shapes {tuple(x.shape)} and {tuple(y.shape)}; "
                             "expected two equal shapes (B, 3, H, W) in [-1, 1]")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS input size {tuple(x.shape[-2:])} is too small; H and W must be >= 16 "
                             "(VGG16 downsamples 16x before relu5_3)")
        b = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W): one VGG pass for both images
        terms = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                f = _unit_normalize(h)  # (2B, C_l, H_l, W_l)
                diff = (f[:b] - f[b:]).pow(2)  # (B, C_l, H_l, W_l)
                head = getattr(self, f"lin{TAPS.index(i)}")
                terms.append(head(diff).mean(dim=(1, 2, 3)))  # (B,): spatial average of w_l . diff
        return torch.stack(terms, dim=1)  # (B, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance between images x and y, (B, 3, H, W) in [-1, 1] -> (B,)."""
        return self.layer_distances(x, y).sum(dim=1)
