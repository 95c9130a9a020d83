"""Atomic file writes, output-folder checks and hashing: nothing half-written, nothing silently overwritten."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ltcache.errors import LtcacheError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a sibling tmp name, then os.replace it over `path` in one step."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(obj):
    """Replace NaN and infinities (an empty shot group) by None, so the output is valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def json_text(obj) -> str:
    return json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json_text(obj) + "\n"))


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def check_output_dir(path: Path, *, overwrite: bool, what: str) -> None:
    """Raise unless `path` is absent, an empty folder, or `overwrite` is set. Read-only: safe on every rank."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LtcacheError(f"{what} {path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LtcacheError(f"{what} {path} already exists; choose another path or pass --overwrite")


def prepare_output_dir(path: Path, *, overwrite: bool, what: str) -> Path:
    """Create `path` for a fresh run; an existing non-empty folder is an error unless `overwrite`."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite, what=what)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
