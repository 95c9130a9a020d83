"""Atomic file writes, output-folder checks and hashing: nothing half-written, nothing silently overwritten."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ltcache.core.errors import LtcacheError

# What a full, read-only or failing disk says: a user's problem to fix, not a bug.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def write_error(path: Path, exc: BaseException) -> LtcacheError | None:
    """A one-line error for a write that the disk refused (full, read-only, too large), or None for anything else.
    HDF5 and torch report the errno inside a multi-line message, so it is looked for there too."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code is None and isinstance(exc, RuntimeError) and ("inline_container" in str(exc)
                                                          or "file write failed" in str(exc)):
        # torch.save's stream writer names no errno ("unexpected pos ...", "file write failed")
        try:
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    if code not in _DISK_ERRNOS:
        return None
    return LtcacheError(f"cannot write {path}: {os.strerror(code)}; free some space or write somewhere writable")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a sibling tmp name, then os.replace it over `path` in one step. A write that the disk
    refuses is a one-line LtcacheError, and leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        error = write_error(path, exc)
        if error is None:
            raise
        raise error from None
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


def read_text(path: Path, what: str = "file") -> str:
    """A text file ltcache reads (class names, prompts, split files, recipes), decoded as UTF-8 (a BOM is dropped).
    Bytes that are not UTF-8 are a one-line error naming the file and the offset, never replacement characters
    that would silently become part of a class name or a path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LtcacheError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LtcacheError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                           "save it as UTF-8") from None


def read_lines(path: Path, what: str = "file") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (a class-names or prompts file)."""
    return [line.strip() for line in read_text(path, what).splitlines() if line.strip()]


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """--class-names FILE: one name per class, in label order; a missing file or a wrong count is a one-line
    error."""
    if not Path(path).is_file():
        raise LtcacheError(f"--class-names {path} not found; pass a text file with one name per line")
    names = read_lines(path)
    if len(names) != num_classes:
        raise LtcacheError(f"--class-names {path} has {len(names)} names for {num_classes} classes; give one per "
                           "class, in label order")
    return names


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json_text(obj) + "\n"))


def append_jsonl(path: Path, obj) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as exc:
        raise (write_error(path, exc) or exc) from None


def canonical_sha256(obj) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces), as it reads back from json_text."""
    text = json.dumps(json.loads(json_text(obj)), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in chunks into one reused buffer (hashlib releases the GIL, so threads overlap)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def mismatched_files(root: Path, expected: Mapping[str, str], *, threads: int | None = None) -> list[str]:
    """The files (relative to `root`) that are missing, unreadable or whose sha256 differs from `expected`,
    hashed on a few threads (about 2 GB/s each with SHA extensions)."""

    def bad(name: str) -> bool:
        try:
            return sha256_file(Path(root) / name) != expected[name]
        except OSError:
            return True

    names = list(expected)
    if not names:
        return []
    workers = max(1, min(len(names), threads or min(4, os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        return [name for name, failed in zip(names, pool.map(bad, names), strict=True) if failed]
