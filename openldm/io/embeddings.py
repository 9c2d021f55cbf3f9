"""Textual-inversion embedding files (Gal et al. 2022, "An Image is Worth One Word"): AUTOMATIC1111's and diffusers'.

Layouts read (every one as float32 vectors (N, D), N >= 1 vectors of the text encoder's width D):

- AUTOMATIC1111 ``.pt`` (``torch.save`` of a dict): ``{"string_to_param": {"*": (N, D)}, "string_to_token": ...,
  "name": ..., "step": ...}``. Read with ``torch.load(weights_only=True)``: tensors and plain containers only,
  never arbitrary pickled objects (files that need them are refused, with the fix).
- ``.safetensors`` holding one tensor: A1111's ``emb_params`` (N, D), or a diffusers token key.
- diffusers ``learned_embeds.safetensors`` / ``learned_embeds.bin``: ``{token: (D,) or (N, D)}``.

Names: the file's stem, as A1111 names embeddings (``easynegative.safetensors`` is "easynegative"); a file named
``learned_embeds.*`` (diffusers' fixed name) takes the token stored in it (``<cat-toy>``). SDXL embeddings
(``clip_g`` / ``clip_l``) are refused by name.

Written (:func:`save_embedding`): A1111's layouts, ``.pt`` as A1111's ``Embedding.save`` writes it (plain dict,
readable with ``weights_only``) or ``.safetensors`` with ``emb_params``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from openldm.io.files import atomic_path
from openldm.models.text_encoder import check_embeddings

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_STEM = "learned_embeds"


def _read_tensors(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"embedding file {str(path)!r} is not a readable safetensors file ({e})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"embedding file {str(path)!r} stores Python objects that are only read by unpickling, "
                         f"which can run code ({str(e).splitlines()[0][:200]}); re-save its vectors as .safetensors "
                         "where it was made") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"embedding file {str(path)!r} is not a readable torch file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"embedding file {str(path)!r} holds a {type(data).__name__}; expected a dict of tensors")
    return data


def read_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """(name, float32 vectors (N, D)) of one embedding file in any layout of the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{str(path)!r}: embedding files end in {', '.join(EMBEDDING_SUFFIXES)}")
    data = _read_tensors(path)
    name = path.stem
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            found = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"embedding file {str(path)!r}: string_to_param must hold one entry, found {found}")
        vectors = next(iter(params.values()))
    elif {"clip_g", "clip_l"} <= set(data):
        raise ValueError(f"embedding file {str(path)!r} is an SDXL embedding (clip_g, clip_l); openldm runs SD 1.x "
                         "and 2.x models, which take one vector set")
    elif len(data) == 1:  # A1111 .safetensors (emb_params) or diffusers {token: vectors}
        key, vectors = next(iter(data.items()))
        if path.stem == DIFFUSERS_STEM and isinstance(key, str):
            name = key
    else:
        raise ValueError(f"embedding file {str(path)!r} holds {sorted(map(str, data))[:8]}; expected A1111's "
                         "string_to_param, one emb_params tensor, or diffusers' one {token: vectors} entry")
    if isinstance(vectors, torch.Tensor) and vectors.dim() == 1:
        vectors = vectors[None]  # diffusers stores a single vector as (D,)
    check_embeddings({name: vectors}, vectors.shape[-1] if isinstance(vectors, torch.Tensor) else 0)
    return name, vectors.detach().float()


def load_embeddings(folder: str | Path, width: int | None = None) -> dict[str, torch.Tensor]:
    """Every embedding file under ``folder`` (recursively, in path order) by name. ``width``: the text encoder's,
    checked for each. Two files with one name are refused (rename one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"embeddings folder {str(folder)!r} does not exist or is not a folder")
    embeddings: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES):
        name, vectors = read_embedding(path)
        if name in sources:
            raise ValueError(f"embeddings {str(sources[name])!r} and {str(path)!r} are both named {name!r}; rename "
                             "one of the files")
        if width is not None:
            check_embeddings({name: vectors}, width)
        embeddings[name], sources[name] = vectors, path
    return embeddings


def save_embedding(vectors: torch.Tensor, path: str | Path, *, name: str | None = None,
                   step: int | None = None) -> Path:
    """Write ``vectors`` (N, D) in A1111's layout (``.pt``: string_to_param etc.; ``.safetensors``: emb_params),
    atomically; returns the path."""
    path = Path(path)
    vectors = vectors.detach().float().cpu().contiguous()
    check_embeddings({name or path.stem: vectors}, vectors.shape[-1] if vectors.dim() else 0)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file({"emb_params": vectors}, str(tmp))
        elif path.suffix.lower() == ".pt":
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                        "name": name or path.stem, "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None},
                       tmp)  # 265: CLIP's id of "*", as A1111 writes it
        else:
            raise ValueError(f"{str(path)!r}: embeddings are saved as .pt or .safetensors")
    return path
