"""File helpers: atomic writes (temporary file in the same folder + rename), shared by every writer, and finding a
file a run's config names."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


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
