"""File helpers: the SHA-256 of a file (A1111's model hashes) against hashlib, read once while the file is unchanged
and again when it changes; the cache folder's setting."""
from __future__ import annotations

import hashlib
import json
import os

from openldm.io.files import HASHES_FILE, cache_dir, file_sha256, short_hash


def test_the_hash_is_the_files_sha256_and_is_kept_while_the_file_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 << 20))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected and short_hash(path) == expected[:10]
    cache_file = tmp_path / "cache" / HASHES_FILE
    kept = json.loads(cache_file.read_text())
    kept[str(path.resolve())]["sha256"] = "f" * 64  # a kept entry is believed while size and mtime hold
    cache_file.write_text(json.dumps(kept))
    assert file_sha256(path) == "f" * 64
    os.utime(path, ns=(1, 1))  # touched: read again
    assert file_sha256(path) == expected
    cache_file.write_text("not json")  # a broken cache is skipped and rewritten
    assert file_sha256(path) == expected and json.loads(cache_file.read_text())
    assert short_hash(tmp_path) is None  # a folder has no A1111 hash
