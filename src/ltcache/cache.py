"""The feature cache, schema v1 (DESIGN.md). The only module that imports h5py.

CACHE/manifest.json is the commit point: a shard exists once the manifest lists it. Shards, heads and the
manifest are written under tmp names and os.replace'd; a whole cache is built in a staging folder and moved
into place at the end, so an interrupted or failed extract never damages an existing cache.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from ltcache import __version__
from ltcache.errors import LtcacheError
from ltcache.fsutil import atomic_write, sha256_file, write_json
from ltcache.heads import HEAD_KINDS, Head
from ltcache.mapping import PAGE, map_float32

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MEMBERSHIP = "membership.h5"
DTYPES = ("float32", "float16")


@dataclass
class Split:
    """One split in memory: features [n, d] float32 and labels [n] int64, ordered by sample index."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> Split:
        return Split(self.features.to(device), self.labels.to(device))


class SplitWriter:
    """Buffers rows of one split and flushes a shard every `shard_rows` rows."""

    def __init__(self, root: Path, name: str, *, feature_dim: int, dtype: str, shard_rows: int):
        self.folder = root / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name, self.feature_dim, self.dtype, self.shard_rows = name, feature_dim, dtype, shard_rows
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.seen_index: list[np.ndarray] = []

    def add(self, features, labels, index) -> None:
        features = np.asarray(features, dtype=self.dtype)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features [n, {self.feature_dim}], got {features.shape}")
        self.buffer.append((features, np.asarray(labels, dtype=np.int64), np.asarray(index, dtype=np.int64)))
        self.buffered += len(features)
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        features, labels, index = (np.concatenate(parts) for parts in zip(*self.buffer, strict=True))
        self.buffer = [(features[rows:], labels[rows:], index[rows:])] if len(features) > rows else []
        self.buffered = len(features) - rows
        path = self.folder / f"{len(self.shards):05d}.h5"

        def write(tmp: Path) -> None:
            # Page-aligned data blocks, so a reader can memory-map the features (mapping.py).
            with h5py.File(tmp, "w", alignment_threshold=1, alignment_interval=PAGE) as f:
                f.create_dataset("features", data=features[:rows])
                f.create_dataset("labels", data=labels[:rows])
                f.create_dataset("index", data=index[:rows])

        atomic_write(path, write)
        self.seen_index.append(index[:rows])
        self.shards.append({"file": f"{self.name}/{path.name}", "rows": rows, "sha256": sha256_file(path)})

    def close(self, expected_rows: int) -> dict:
        """Flush the remainder and check that every sample index 0..expected_rows-1 appears exactly once."""
        if self.buffered:
            self._flush(self.buffered)
        seen = np.sort(np.concatenate(self.seen_index)) if self.seen_index else np.empty(0, np.int64)
        if len(seen) != expected_rows or not np.array_equal(seen, np.arange(expected_rows)):
            raise LtcacheError(f"split {self.name}: extracted {len(seen)} rows but expected each of "
                               f"{expected_rows} sample indices exactly once")
        return {"rows": expected_rows, "shards": self.shards}


class CacheWriter:
    """Builds a cache in a staging folder beside `path`; `commit` writes the manifest and moves it into place."""

    def __init__(self, path: Path, *, feature_dim: int, dtype: str = "float32", shard_rows: int = 65536,
                 overwrite: bool = False):
        self.check_target(path, dtype=dtype, shard_rows=shard_rows, overwrite=overwrite)
        self.path = Path(path)
        self.staging = self.path.with_name(f".{self.path.name}.staging-{os.getpid()}")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.feature_dim, self.dtype, self.shard_rows = feature_dim, dtype, shard_rows
        self.splits: dict[str, dict] = {}

    @staticmethod
    def check_target(path: Path, *, dtype: str, shard_rows: int, overwrite: bool) -> None:
        """Fail before any work when the options are bad or `path` exists (unless overwrite)."""
        if dtype not in DTYPES:
            raise LtcacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if shard_rows < 1:
            raise LtcacheError(f"--shard-rows must be >= 1, got {shard_rows}")
        if Path(path).exists() and not overwrite:
            raise LtcacheError(f"cache folder {path} already exists; choose another path or pass --overwrite")

    def split(self, name: str) -> SplitWriter:
        return SplitWriter(self.staging, name, feature_dim=self.feature_dim, dtype=self.dtype,
                           shard_rows=self.shard_rows)

    def finish_split(self, writer: SplitWriter, expected_rows: int, **about) -> None:
        """Close a split; `about` (e.g. views=K, of="train") is recorded beside its rows in the manifest."""
        self.splits[writer.name] = {**writer.close(expected_rows), **about}

    def write_joint_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("weight", data=weight.detach().cpu().float().numpy())
                f.create_dataset("bias", data=bias.detach().cpu().float().numpy())

        atomic_write(self.staging / "head.h5", write)

    def write_membership(self, source_index: dict[str, np.ndarray]) -> None:
        """Per split, the position of every row (by sample index) in the dataset's source files."""

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                for split, positions in source_index.items():
                    f.create_dataset(split, data=np.asarray(positions, dtype=np.int64))

        atomic_write(self.staging / MEMBERSHIP, write)

    def commit(self, *, dataset: dict, backbone: dict) -> Path:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "ltcache_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": {k: v for k, v in dataset.items() if k not in ("class_names", "train_class_counts")},
            "class_names": dataset["class_names"],
            "class_counts": dataset["train_class_counts"],
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "backbone": backbone,
            "splits": self.splits,
        }
        if (self.staging / MEMBERSHIP).is_file():
            manifest["membership"] = MEMBERSHIP
        write_json(self.staging / MANIFEST, manifest)
        if self.path.exists():  # --overwrite: swap the old cache out only now that the new one is complete
            retired = self.path.with_name(f".{self.path.name}.retired-{os.getpid()}")
            os.replace(self.path, retired)
            os.replace(self.staging, self.path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(self.staging, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class FeatureCache:
    """Reads a cache: manifest, splits as in-memory tensors (shape-checked against the manifest), heads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise LtcacheError(f"cache {self.path} not found; create one with ltcache extract")
        if not manifest_path.is_file():
            raise LtcacheError(f"{self.path} has no {MANIFEST}; it is not a finished cache (re-run ltcache extract)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LtcacheError(f"{manifest_path} is unreadable ({exc.msg if hasattr(exc, 'msg') else exc}); "
                               "re-run ltcache extract") from None
        version = self.manifest.get("schema_version") if isinstance(self.manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise LtcacheError(f"{manifest_path} has schema version {version!r}; this ltcache reads version "
                               f"{SCHEMA_VERSION} (re-run ltcache extract)")

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

    def load_split(self, name: str) -> Split:
        """All rows of a split as float32 features and int64 labels, ordered by sample index.

        When the shards hold float32 rows in index order, page-aligned (as CacheWriter writes them), the features
        are memory-mapped (mapping.py): no read, no copy. Otherwise they are read into memory.
        """
        if name not in self.manifest["splits"]:
            raise LtcacheError(f"cache {self.path} has no split {name!r}; it has {', '.join(self.split_names())}")
        entry = self.manifest["splits"][name]
        rows, dim = int(entry["rows"]), self.feature_dim
        labels = np.empty(rows, dtype=np.int64)
        filled = np.zeros(rows, dtype=bool)
        shards, in_order, start = [], True, 0  # in_order: each shard holds rows start .. start + n - 1, back to back
        for shard in entry["shards"]:
            path = self.path / shard["file"]
            if not path.is_file():
                raise LtcacheError(f"shard {path} listed in the manifest is missing; re-run ltcache extract")
            with h5py.File(path, "r") as f:
                shapes = {k: f[k].shape for k in ("features", "labels", "index")}
                if shapes["features"] != (shard["rows"], dim) or shapes["labels"] != (shard["rows"],) \
                        or shapes["index"] != (shard["rows"],):
                    raise LtcacheError(f"shard {shard['file']} has features {shapes['features']} but the manifest "
                                       f"says ({shard['rows']}, {dim}); the cache is corrupt, re-run ltcache extract")
                index = f["index"][:]
                if index.min(initial=0) < 0 or index.max(initial=-1) >= rows or filled[index].any():
                    raise LtcacheError(f"shard {shard['file']} has sample indices outside 0..{rows - 1} or repeated; "
                                       "re-run ltcache extract")
                in_order = in_order and np.array_equal(index, np.arange(start, start + len(index)))
                start += len(index)
                labels[index] = f["labels"][:]
                filled[index] = True
                features = f["features"]
                offset = features.id.get_offset() if features.dtype == np.dtype("<f4") else None
                shards.append((path, index, offset))
        if not filled.all():
            raise LtcacheError(f"split {name} covers {int(filled.sum())} of {rows} rows; re-run ltcache extract")
        mapped = None
        if in_order and all(offset is not None for _, _, offset in shards):
            mapped = map_float32([(path, offset, len(index) * dim * 4) for path, index, offset in shards], (rows, dim))
        return Split(torch.from_numpy(mapped if mapped is not None else self._read_features(shards, rows)),
                     torch.from_numpy(labels))

    def _read_features(self, shards: list, rows: int) -> np.ndarray:
        features = np.empty((rows, self.feature_dim), dtype=np.float32)
        for path, index, _ in shards:
            with h5py.File(path, "r") as f:
                first = int(index[0]) if len(index) else 0
                if np.array_equal(index, np.arange(first, first + len(index))):
                    if len(index):  # rows already in order: read straight into place, no scatter copy
                        f["features"].read_direct(features, dest_sel=np.s_[first : first + len(index)])
                else:
                    features[index] = f["features"][:]
        return features

    def verify(self) -> list[str]:
        """Shards whose sha256 differs from the manifest's (empty when the cache is intact)."""
        return [s["file"] for entry in self.manifest["splits"].values() for s in entry["shards"]
                if not (self.path / s["file"]).is_file() or sha256_file(self.path / s["file"]) != s["sha256"]]

    def membership(self, split: str) -> np.ndarray:
        """Source positions of a split's rows (row i came from source position membership[i])."""
        with h5py.File(self.path / MEMBERSHIP, "r") as f:
            return f[split][:]

    def joint_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        with h5py.File(self.path / "head.h5", "r") as f:
            return torch.from_numpy(f["weight"][:]), torch.from_numpy(f["bias"][:])

    @property
    def heads_dir(self) -> Path:
        return self.path / "heads"

    @property
    def reports_dir(self) -> Path:
        return self.path / "reports"

    def save_head(self, name: str, head: Head, attrs: dict) -> Path:
        """Store a fitted head (any kind in heads.py) with its hyperparameters (JSON) as attributes."""
        self.heads_dir.mkdir(exist_ok=True)
        path = self.heads_dir / f"{name}.h5"

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                for key, tensor in head.tensors().items():
                    f.create_dataset(key, data=tensor.detach().cpu().float().numpy())
                f.attrs["kind"] = head.kind
                f.attrs["options"] = json.dumps(head.options())
                f.attrs["method"] = name
                f.attrs["hyperparameters"] = json.dumps(attrs)

        atomic_write(path, write)
        return path

    def load_head(self, name: str) -> tuple[Head, dict]:
        """A stored head and the hyperparameters it was fitted with."""
        path = self.heads_dir / f"{name}.h5"
        if not path.is_file():
            raise LtcacheError(f"no fitted head {name!r} in {self.heads_dir}; run ltcache compare first")
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind", "linear")
            if kind not in HEAD_KINDS:
                raise LtcacheError(f"head {path} is of kind {kind!r}, which this ltcache cannot read; upgrade ltcache")
            tensors = {key: torch.as_tensor(np.asarray(f[key][()])) for key in f}
            options = (json.loads(f.attrs["options"]) if "options" in f.attrs  # heads written before kinds existed:
                       else {"normalize_input": bool(f.attrs.get("normalize_input", False))})
            head = HEAD_KINDS[kind].from_saved(tensors, options)
            return head, json.loads(f.attrs["hyperparameters"])

    def head_names(self) -> list[str]:
        return sorted(p.stem for p in self.heads_dir.glob("*.h5")) if self.heads_dir.is_dir() else []
