"""File helpers: atomic writes (temporary file in the same folder + rename), shared by every writer; finding a
file a run's config names; openldm's cache folder; files' SHA-256 (A1111's model hashes), cached."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

CACHE_ENV = "OPENLDM_CACHE"  # where openldm keeps what it computes once (default ~/.cache/openldm)
HASHES_FILE = "hashes.json"
SHORT_HASH = 10  # hex digits of A1111's short hash ("Model hash", "VAE hash")
LORA_SHORT_HASH = 12  # hex digits of A1111's "Lora hashes" entries


def cache_dir() -> Path:
    """``$OPENLDM_CACHE``, else ``~/.cache/openldm`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "openldm")


def file_sha256(path: str | Path, *, tensors_only: bool = False) -> str:
    """The SHA-256 of a file's bytes (hex), as A1111 hashes checkpoints and VAEs; ``tensors_only``: of a
    safetensors file's bytes after its header (kohya's and A1111's LoRA hash, which metadata edits leave alone).
    Kept in ``cache_dir() / hashes.json`` by resolved path, size and modification time, so a file is read once
    while it is unchanged (several GB take seconds); a cache that cannot be read or written is skipped."""
    import hashlib
    import json

    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path) + ("#tensors" if tensors_only else ""), [stat.st_size, stat.st_mtime_ns]
    cache_file = cache_dir() / HASHES_FILE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if tensors_only:  # safetensors: an 8-byte little-endian header length, the JSON header, then the tensors
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache = ({k: v for k, v in cache.items() if os.path.exists(k.removesuffix("#tensors"))}  # drop gone files
             if isinstance(cache, dict) else {})
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
    return cache[key]["sha256"]


def short_hash(path: str | Path) -> str | None:
    """A1111's short hash of a file (the first :data:`SHORT_HASH` hex digits of its SHA-256); None for a folder."""
    return file_sha256(path)[:SHORT_HASH] if Path(path).is_file() else None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, on error it is removed.
    A crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def find_in_run(path: str, run_dir: Path, what: str = "autoencoder") -> Path:
    """A path the config names (its autoencoder, base model, a conditioner's file): inside the run directory (an exported run keeps
    its autoencoder there), else as written (relative to the working directory training ran in)."""
    candidates = ([run_dir / path] if not Path(path).is_absolute() else []) + [Path(path)]
    for p in candidates:
        if p.is_file() or (what == "base_model" and p.is_dir()):
            return p
    fix = f"pass {what}=PATH to load_run" if what in ("autoencoder", "base_model") else "put it in the run directory"
    raise FileNotFoundError(f"the run's {what} {path!r} was not found (tried {[str(p) for p in candidates]}); {fix}")
