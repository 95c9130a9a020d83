"""The cache's schema v1 (docs/reference/cache-schema.md): its file names, the manifest's keys and types, the
shard naming, and the checks every reader and writer applies (manifest, head arrays, finite features)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import canonical_sha256
from ltcache.core.options import DTYPE

if TYPE_CHECKING:
    pass


SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HEAD = "head.h5"
MEMBERSHIP = "membership.h5"
TEXT_HEAD = "zero_shot_head.h5"  # CLIP's zero-shot text head (extract --zero-shot): logits = W @ normalize(f)
DTYPES = tuple(DTYPE.choices)


def shard_file(split: str, number: int) -> str:
    """The file of shard `number` of `split`, relative to the cache: SPLIT/NNNNN.h5."""
    return f"{split}/{number:05d}.h5"

FINITE_CHECK_VALUES = 1 << 22  # values per block of the finiteness check: a 4 MiB boolean temporary at most
_HEX = set("0123456789abcdef")


def check_finite(features: np.ndarray, where: str) -> None:
    """Raise on the first NaN or infinite value, checked block by block (no full-size temporary)."""
    rows = max(1, FINITE_CHECK_VALUES // max(1, features.shape[1] if features.ndim == 2 else 1))
    for start in range(0, len(features), rows):
        block = features[start : start + rows]
        finite = np.isfinite(block)
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0][0])
            raise LtcacheError(f"{where} holds a NaN or infinite value (row {row}); the data is damaged, re-run "
                               "ltcache extract")


def _damaged(where: str, what: str) -> LtcacheError:
    return LtcacheError(f"{where}: {what}; the cache was edited or damaged, re-run ltcache extract")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_relative(where: str, name) -> str:
    """A file named by the manifest must stay inside the cache: relative, no '..', no backslashes."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise _damaged(where, f"file {name!r} does not name a file inside the cache")
    return name


def check_manifest(manifest, where: str) -> None:
    """Every key a reader relies on, with its type: a damaged manifest is a one-line error, never a KeyError."""
    if not isinstance(manifest, dict):
        raise _damaged(where, "it is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LtcacheError(f"{where} has schema version {version!r}; this ltcache reads version {SCHEMA_VERSION} "
                           "(re-run ltcache extract)")
    names, counts = manifest.get("class_names"), manifest.get("class_counts")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise _damaged(where, "'class_names' must be a list of at least 2 names")
    if not isinstance(counts, list) or len(counts) != len(names) or not all(_is_int(c) and c >= 0 for c in counts):
        raise _damaged(where, f"'class_counts' must be {len(names)} non-negative integers, one per class")
    if not _is_int(manifest.get("feature_dim")) or manifest["feature_dim"] < 1:
        raise _damaged(where, f"'feature_dim' must be a positive integer, got {manifest.get('feature_dim')!r}")
    if manifest.get("dtype") not in DTYPES:
        raise _damaged(where, f"'dtype' must be one of {', '.join(DTYPES)}, got {manifest.get('dtype')!r}")
    for key in ("dataset", "backbone"):
        if not isinstance(manifest.get(key), dict):
            raise _damaged(where, f"{key!r} must be a JSON object")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise _damaged(where, "'splits' must hold at least the train split")
    for name, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not _is_int(entry.get("rows") if isinstance(entry, dict) else None) or entry["rows"] < 0 \
                or not isinstance(shards, list):
            raise _damaged(where, f"split {name!r} must have integer 'rows' and a list of 'shards'")
        for shard in shards:
            if not isinstance(shard, dict) or not _is_int(shard.get("rows")) or shard["rows"] < 0 \
                    or not _is_sha256(shard.get("sha256")):
                raise _damaged(where, f"a shard of split {name!r} lacks integer 'rows' or a sha256")
            _check_relative(where, shard.get("file"))
        if sum(shard["rows"] for shard in shards) != entry["rows"]:
            raise _damaged(where, f"the shards of split {name!r} hold {sum(s['rows'] for s in shards)} rows, "
                                  f"not {entry['rows']}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(_is_sha256(v) for v in files.values()):
        raise _damaged(where, "'files' must map file names to sha256 digests")
    for name in files:
        _check_relative(where, name)
    if "manifest_sha256" in manifest:
        content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        if canonical_sha256(content) != manifest["manifest_sha256"]:
            raise _damaged(where, "its content does not match its manifest_sha256 (it was edited after extract)")


def check_head_arrays(weight: np.ndarray, bias: np.ndarray | None, *, num_classes: int, feature_dim: int,
                      where: str, has_bias: bool = True) -> None:
    """A usable stored head: weight [C, d] and (unless not `has_bias`: the text head) bias [C], finite, with no
    all-zero class row."""
    if not has_bias:
        bias = np.zeros(num_classes, dtype=np.float32)
    if bias is None:
        raise _damaged(where, "it has no 'bias'")
    if weight.shape != (num_classes, feature_dim) or bias.shape != (num_classes,):
        raise _damaged(where, f"weight {weight.shape} and bias {bias.shape} should be ({num_classes}, {feature_dim}) "
                              f"and ({num_classes},) for {num_classes} classes of {feature_dim}-d features")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise _damaged(where, "it holds NaN or infinite values")
    zero = np.flatnonzero(~weight.any(axis=1))
    if len(zero):
        raise _damaged(where, f"the weight row of class {int(zero[0])} is all zeros")
