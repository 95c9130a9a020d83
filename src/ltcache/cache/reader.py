"""Reading a cache: FeatureCache, verified on every read (the manifest's keys and types, the sha256 of each file
it reads, shapes against the manifest, labels in range and agreeing with the class counts, sample indices covering
every row once, finite features and head)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ltcache.cache.schema import (
    HEAD,
    MANIFEST,
    MEMBERSHIP,
    TEXT_HEAD,
    _damaged,
    check_finite,
    check_head_arrays,
    check_manifest,
)
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import CACHE, recover
from ltcache.core.fsutil import atomic_write, mismatched_files
from ltcache.core.mapping import map_rows
from ltcache.heads import HEAD_KINDS, Head, LinearHead

if TYPE_CHECKING:
    import torch


@dataclass
class Split:
    """One split in memory: features [n, d] (float32, or float16 from a float16 cache) and labels [n] int64, ordered
    by sample index."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> Split:
        return Split(self.features.to(device), self.labels.to(device))


class FeatureCache:
    """Reads a cache: manifest, splits as in-memory tensors (checked as they are read), the joint head, heads.

    With `verify` (the default) every file read is first checked against its sha256 in the manifest.
    """

    def __init__(self, path: Path, *, verify: bool = True):
        self.path = Path(path)
        if not self.path.exists() and self.path.parent.is_dir():
            recover(self.path, CACHE)  # a swap interrupted between its two renames
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise LtcacheError(f"cache {self.path} not found; create one with ltcache extract")
        if not manifest_path.is_file():
            raise LtcacheError(f"{self.path} has no {MANIFEST}; it is not a finished cache (re-run ltcache extract)")
        try:
            self.manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise LtcacheError(f"{manifest_path} is unreadable ({getattr(exc, 'msg', None) or type(exc).__name__}); "
                               "re-run ltcache extract") from None
        check_manifest(self.manifest, str(manifest_path))
        self.verify_hashes = verify
        if "manifest_sha256" not in self.manifest:
            print(f"warning: {self.path} was written by an older ltcache: head.h5, membership.h5 and the manifest "
                  "carry no sha256, so edits to them go unnoticed; re-run ltcache extract to have them checked",
                  file=sys.stderr, flush=True)

    @property
    def generation(self) -> str | None:
        """A fresh id for every cache written at this path: a reader compares it to notice a swap."""
        return self.manifest.get("generation")

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.manifest["class_counts"], dtype=np.int64)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def has_split(self, name: str) -> bool:
        return name in self.manifest["splits"]

    def _file(self, name: str) -> Path:
        """A file named by the manifest, which must resolve inside the cache (no link leads out of it)."""
        path = self.path / name
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise _damaged(str(self.path / MANIFEST), f"{name} leads outside the cache")
        return path

    def _verify(self, expected: dict[str, str]) -> None:
        if not self.verify_hashes:
            return
        for name in expected:
            self._file(name)
        bad = mismatched_files(self.path, expected)
        if bad:
            missing = [name for name in bad if not (self.path / name).is_file()]
            what = f"{missing[0]} is missing" if missing else f"{bad[0]} fails its sha256 check (it changed after " \
                                                              "extract)"
            more = f" ({len(bad)} files in all)" if len(bad) > 1 else ""
            raise LtcacheError(f"cache {self.path}: {what}{more}; re-run ltcache extract")

    def _verify_recorded(self, name: str) -> None:
        """Check a file of `files` (head.h5, membership.h5) against its sha256; caches from before it was recorded
        have none to check."""
        recorded = self.manifest.get("files", {})
        self._verify({name: recorded[name]} if name in recorded else {})

    def load_split(self, name: str) -> Split:
        """All rows of a split as features in the cache's dtype (float32, or float16: stage 2 upcasts a block at a
        time) and int64 labels, ordered by sample index, checked on the way (read_split, as torch tensors)."""
        import torch

        features, labels = self.read_split(name)
        return Split(torch.from_numpy(features), torch.from_numpy(labels))

    def read_split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's features and labels as numpy arrays, ordered by sample index, with every check load_split makes
        (its shards' sha256, shapes, labels, indices, finite features); no torch is imported.

        When the shards hold rows of the cache's dtype in index order, page-aligned (as CacheWriter writes them), the
        features are memory-mapped (mapping.py): no read, no copy. Otherwise they are read into memory.
        """
        if name not in self.manifest["splits"]:
            raise LtcacheError(f"cache {self.path} has no split {name!r}; it has {', '.join(self.split_names())}")
        entry = self.manifest["splits"][name]
        self._verify({shard["file"]: shard["sha256"] for shard in entry["shards"]})
        rows, dim = int(entry["rows"]), self.feature_dim
        labels = np.empty(rows, dtype=np.int64)
        filled = np.zeros(rows, dtype=bool)
        shards, in_order, start = [], True, 0  # in_order: each shard holds rows start .. start + n - 1, back to back
        for shard in entry["shards"]:
            path = self._file(shard["file"])
            if not path.is_file():
                raise LtcacheError(f"shard {path} listed in the manifest is missing; re-run ltcache extract")
            try:
                index, shard_labels, offset = self._read_shard(path, shard["rows"], dim)
            except (OSError, KeyError, ValueError, TypeError) as exc:
                raise _damaged(f"shard {shard['file']}", f"it is unreadable ({type(exc).__name__})") from None
            if index.min(initial=0) < 0 or index.max(initial=-1) >= rows or filled[index].any() \
                    or len(np.unique(index)) != len(index):
                raise _damaged(f"shard {shard['file']}", f"its sample indices fall outside 0..{rows - 1} or repeat")
            in_order = in_order and np.array_equal(index, np.arange(start, start + len(index)))
            start += len(index)
            labels[index] = shard_labels
            filled[index] = True
            shards.append((path, index, offset))
        if not filled.all():
            raise _damaged(f"split {name}", f"its shards cover {int(filled.sum())} of {rows} rows")
        self._check_labels(name, entry, labels)
        mapped = None
        if in_order and all(offset is not None for _, _, offset in shards):
            # float16 stays float16 in memory (half the RAM); stage 2 upcasts it a block at a time (logits.py).
            dtype = np.dtype(self.manifest["dtype"])
            mapped = map_rows([(path, offset, len(index) * dim * dtype.itemsize) for path, index, offset in shards],
                              (rows, dim), dtype)
        features = mapped if mapped is not None else self._read_features(shards, rows)
        check_finite(features, f"split {name} of cache {self.path}")
        return features, labels

    def _read_shard(self, path: Path, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """A shard's index and labels, checked against the manifest's shape; the byte offset of its features when
        they can be mapped (contiguous, little-endian, of the cache's dtype)."""
        with h5py.File(path, "r") as f:
            shapes = {k: f[k].shape for k in ("features", "labels", "index")}
            if shapes["features"] != (rows, dim) or shapes["labels"] != (rows,) or shapes["index"] != (rows,):
                raise _damaged(f"shard {path.relative_to(self.path)}",
                               f"it has features {shapes['features']} but the manifest says ({rows}, {dim})")
            if f["features"].dtype.kind != "f" or f["labels"].dtype.kind not in "iu" \
                    or f["index"].dtype.kind not in "iu":
                raise _damaged(f"shard {path.relative_to(self.path)}", "its arrays have the wrong types")
            index, labels = f["index"][:].astype(np.int64), f["labels"][:].astype(np.int64)
            features = f["features"]
            mappable = features.dtype == np.dtype(self.manifest["dtype"]).newbyteorder("<")
            offset = features.id.get_offset() if mappable else None
        return index, labels, offset

    def _check_labels(self, name: str, entry: dict, labels: np.ndarray) -> None:
        """Labels in 0..C-1; train's agree with the manifest's class counts (augmented views: K times them)."""
        num_classes = self.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
            raise _damaged(f"split {name}", f"it has label {bad}, outside the {num_classes} classes")
        if name == "train" or entry.get("of") == "train":
            views = int(entry.get("views", 1)) if name != "train" else 1
            counts = np.bincount(labels, minlength=num_classes)
            if not np.array_equal(counts, views * self.class_counts):
                raise _damaged(f"cache {self.path}", f"the manifest's class_counts {self.class_counts.tolist()[:5]}... "
                                                     f"disagree with the {name} labels {counts.tolist()[:5]}...")

    def _read_features(self, shards: list, rows: int) -> np.ndarray:
        features = np.empty((rows, self.feature_dim), dtype=np.dtype(self.manifest["dtype"]))
        for path, index, _ in shards:
            with h5py.File(path, "r") as f:
                first = int(index[0]) if len(index) else 0
                if np.array_equal(index, np.arange(first, first + len(index))):
                    if len(index):  # rows already in order: read straight into place, no scatter copy
                        f["features"].read_direct(features, dest_sel=np.s_[first : first + len(index)])
                else:
                    features[index] = f["features"][:]
        return features

    def files(self) -> dict[str, str]:
        """Every file the cache depends on, with the sha256 the manifest records for it."""
        files = {shard["file"]: shard["sha256"] for entry in self.manifest["splits"].values()
                 for shard in entry["shards"]}
        return {**files, **self.manifest.get("files", {})}

    def verify(self) -> list[str]:
        """Files that are missing or whose sha256 differs from the manifest's (empty when the cache is intact)."""
        for name in self.files():
            self._file(name)
        return mismatched_files(self.path, self.files())

    def unlisted(self) -> list[str]:
        """Files in the cache folder that the manifest does not list and that are not compare's (heads/, reports/,
        history/, a compare's .compare.staging-PID): left over, or put there by something else. Sorted, relative
        to the cache."""
        listed = {*self.files(), MANIFEST}
        results = ("heads", "reports", "history")
        found = []
        for path in sorted(self.path.rglob("*")):
            relative = path.relative_to(self.path).as_posix()
            top = relative.split("/", 1)[0]
            if path.is_dir() or relative in listed or top in results or top.startswith(".compare.staging-"):
                continue
            found.append(relative)
        return found

    def membership(self, split: str) -> np.ndarray:
        """Source positions of a split's rows (row i came from source position membership[i])."""
        self._verify_recorded(MEMBERSHIP)
        try:
            with h5py.File(self._file(MEMBERSHIP), "r") as f:
                return f[split][:]
        except (OSError, KeyError) as exc:
            raise _damaged(f"{self.path / MEMBERSHIP}", f"it is unreadable ({type(exc).__name__})") from None

    def joint_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The jointly trained classifier (W [C, d], b [C]), checked: hash, shapes, finite, no all-zero row."""
        import torch

        weight, bias = self.joint_arrays()
        return torch.from_numpy(weight), torch.from_numpy(bias)

    def joint_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """joint_head as float32 numpy arrays, with the same checks; no torch is imported."""
        self._verify_recorded(HEAD)
        where = str(self.path / HEAD)
        try:
            with h5py.File(self._file(HEAD), "r") as f:
                weight = np.asarray(f["weight"][()], dtype=np.float32) if "weight" in f else None
                bias = np.asarray(f["bias"][()], dtype=np.float32) if "bias" in f else None
        except (OSError, ValueError, TypeError) as exc:
            raise _damaged(where, f"it is unreadable ({type(exc).__name__})") from None
        if weight is None:
            raise _damaged(where, "it has no 'weight'")
        check_head_arrays(weight, bias, num_classes=self.num_classes, feature_dim=self.feature_dim, where=where)
        return weight, bias

    def text_head(self) -> LinearHead | None:
        """The zero-shot text head (extract --zero-shot) as a head on normalized features, checked like the joint
        head; None when the cache has none."""
        if TEXT_HEAD not in self.manifest.get("files", {}):
            return None
        self._verify_recorded(TEXT_HEAD)
        where = str(self.path / TEXT_HEAD)
        try:
            with h5py.File(self._file(TEXT_HEAD), "r") as f:
                weight = np.asarray(f["weight"][()], dtype=np.float32) if "weight" in f else None
                projection = np.asarray(f["projection"][()], dtype=np.float32) if "projection" in f else None
        except (OSError, ValueError, TypeError) as exc:
            raise _damaged(where, f"it is unreadable ({type(exc).__name__})") from None
        if weight is None:
            raise _damaged(where, "it has no 'weight'")
        width = self.feature_dim
        if projection is not None:  # extract --features both: the head reads normalize(f @ projection)
            if projection.ndim != 2 or projection.shape[0] != self.feature_dim or not np.isfinite(projection).all():
                raise _damaged(where, f"its projection {projection.shape} does not map the {self.feature_dim}-d "
                               "features to finite values")
            width = projection.shape[1]
        check_head_arrays(weight, None, num_classes=self.num_classes, feature_dim=width, where=where,
                          has_bias=False)
        import torch

        return LinearHead(torch.from_numpy(weight), None, normalize_input=True,
                          projection=None if projection is None else torch.from_numpy(projection))

    @property
    def heads_dir(self) -> Path:
        return self.path / "heads"

    @property
    def reports_dir(self) -> Path:
        return self.path / "reports"

    def save_head(self, name: str, head: Head, attrs: dict, *, folder: Path | None = None) -> Path:
        """Store a fitted head (any kind in heads.py) with its hyperparameters (JSON) as attributes, in `folder`
        (default CACHE/heads)."""
        folder = Path(folder) if folder is not None else self.heads_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.h5"

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                for key, tensor in head.tensors().items():  # float tensors as float32, integer ones (labels) as is
                    tensor = tensor.detach().cpu()
                    f.create_dataset(key, data=(tensor.float() if tensor.is_floating_point() else tensor).numpy())
                f.attrs["kind"] = head.kind
                f.attrs["options"] = json.dumps(head.options())
                f.attrs["method"] = name
                f.attrs["hyperparameters"] = json.dumps(attrs)
                f.attrs["cache_generation"] = self.generation or ""

        atomic_write(path, write)
        return path

    def load_head(self, name: str, *, folder: Path | None = None) -> tuple[Head, dict]:
        """A stored head and the hyperparameters it was fitted with."""
        folder = Path(folder) if folder is not None else self.heads_dir
        path = folder / f"{name}.h5"
        if not path.is_file():
            raise LtcacheError(f"no fitted head {name!r} in {folder}; run ltcache compare first")
        import torch

        try:
            with h5py.File(path, "r") as f:
                kind = f.attrs.get("kind", "linear")
                if kind not in HEAD_KINDS:
                    raise LtcacheError(f"head {path} is of kind {kind!r}, which this ltcache cannot read; "
                                       "upgrade ltcache")
                tensors = {key: torch.as_tensor(np.asarray(f[key][()])) for key in f}
                options = (json.loads(f.attrs["options"]) if "options" in f.attrs  # heads written before kinds:
                           else {"normalize_input": bool(f.attrs.get("normalize_input", False))})
                head = HEAD_KINDS[kind].from_saved(tensors, options)
                return head, json.loads(f.attrs["hyperparameters"])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise LtcacheError(f"head {path} is unreadable ({type(exc).__name__}); re-run ltcache compare") from None

    def head_names(self, *, folder: Path | None = None) -> list[str]:
        folder = Path(folder) if folder is not None else self.heads_dir
        return sorted(p.stem for p in folder.glob("*.h5")) if folder.is_dir() else []


def read_manifest(path: Path) -> dict:
    """The manifest of the cache at `path`, checked (its keys and types) without reading a shard: what a report or
    a results folder needs to know of a cache (its generation, dataset, backbone)."""
    return FeatureCache(path, verify=False).manifest


def cache_folder(path: Path | str) -> Path:
    """The cache a user pointed at: the folder itself, or its manifest.json (a path a shell completes to)."""
    path = Path(path)
    return path.parent if path.name == "manifest.json" and path.is_file() else path
