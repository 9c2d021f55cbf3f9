"""openldm's own model file: one ``.safetensors`` file whose metadata carries the model's registered kind and its
resolved config, so that the path alone rebuilds the model (``load_model(path)``).

Metadata keys: ``openldm.kind`` (a name in the MODELS registry), ``openldm.config`` (JSON of the config dataclass)
and ``openldm.format`` (version). Extra string metadata (e.g. a latent scale factor) may ride along.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from openldm.config import from_dict, to_dict
from openldm.io.files import atomic_path
from openldm.registry import MODELS

FORMAT_VERSION = "1"


def model_kind(module: nn.Module) -> str:
    """The registry name of ``module``'s class."""
    for name, cls in MODELS.items():
        if type(module) is cls:
            return name
    raise ValueError(f"{type(module).__name__} is not a registered model; registered: {', '.join(MODELS.names())}")


def save_model(module: nn.Module, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``module``'s weights and config (``module.config``) to ``path`` atomically."""
    if not hasattr(module, "config"):
        raise ValueError(f"{type(module).__name__} has no .config; only registered openldm models can be saved")
    meta = {
        "openldm.format": FORMAT_VERSION,
        "openldm.kind": model_kind(module),
        "openldm.config": json.dumps(to_dict(module.config)),
        **(extra or {}),
    }
    # safetensors refuses shared storage and non-contiguous tensors: save contiguous clones of shared ones.
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model from an openldm ``.safetensors`` file alone. The module is built on the meta device and the
    memory-mapped tensors are assigned into it, so the weights are never held twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    meta = read_metadata(path)
    if "openldm.kind" not in meta:
        raise ValueError(f"{str(path)!r} is not an openldm model file (no 'openldm.kind' metadata); "
                         "for Stable Diffusion or diffusers checkpoints use `openldm convert` or the SD loaders")
    cls = MODELS.get(meta["openldm.kind"])
    cfg = from_dict(cls.config_class, json.loads(meta["openldm.config"]))
    with torch.device("meta"):
        module = cls(cfg)
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for k in f.keys():
            t = f.get_tensor(k)
            state[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)
    _check_no_meta(module)
    return module.eval()


def _check_no_meta(module: nn.Module) -> None:
    """Non-persistent buffers are not in the file and stay on the meta device: registered models must not have any
    (derive such constants in forward instead). Fail loudly rather than compute with meta tensors."""
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left} were not restored from the file; make them persistent or derive them lazily")
