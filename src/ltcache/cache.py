"""The feature cache, schema v1 (the README's "Cache schema"). The only module that imports h5py; torch is imported
only where tensors are made.

CACHE/manifest.json is the commit point: a shard exists once the manifest lists it. A cache is built in a staging
folder beside its target and swapped into place whole (folders.py), so an interrupted or failed extract never damages
an existing cache, and a reader never sees one half-written.

Every file a cache depends on carries a sha256 in the manifest (shards, head.h5, membership.h5), and the manifest
carries one of its own content (`manifest_sha256`), so an edited class-count list is caught too. Every read checks
what it can: the manifest's keys and types, the hashes of the files it reads, shapes against the manifest, labels in
range and agreeing with the class counts, sample indices covering every row once, finite features and head.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ltcache._version import __version__
from ltcache.errors import LtcacheError
from ltcache.folders import CACHE, StagedFolder, check_target, recover
from ltcache.fsutil import append_jsonl, atomic_write, canonical_sha256, mismatched_files, sha256_file, write_json
from ltcache.heads import HEAD_KINDS, Head, LinearHead
from ltcache.mapping import PAGE, map_rows
from ltcache.options import DTYPE, SHARD_ROWS
from ltcache.params import check_all

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HEAD = "head.h5"
MEMBERSHIP = "membership.h5"
TEXT_HEAD = "zero_shot_head.h5"  # CLIP's zero-shot text head (extract --zero-shot): logits = W @ normalize(f)
DTYPES = tuple(DTYPE.choices)
FINITE_CHECK_VALUES = 1 << 22  # values per block of the finiteness check: a 4 MiB boolean temporary at most
_HEX = set("0123456789abcdef")


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


class SplitWriter:
    """Buffers rows of one split and flushes a shard every `shard_rows` rows."""

    def __init__(self, root: Path, name: str, *, feature_dim: int, dtype: str, shard_rows: int,
                 shard_ids: list[int] | None = None, journal: Path | None = None):
        self.folder = root / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name, self.feature_dim, self.dtype, self.shard_rows = name, feature_dim, dtype, shard_rows
        # Shard k holds sample indices [k * shard_rows, (k + 1) * shard_rows) when the rows arrive as whole shards in
        # index order (extract): `shard_ids` names the shards in the order they are written, whatever process
        # writes them, and each finished shard gets a line in `journal`, so an interrupted extract resumes.
        self.shard_ids = list(shard_ids) if shard_ids is not None else None
        self.journal = journal
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.seen_index: list[np.ndarray] = []
        self.label_counts = np.zeros(0, dtype=np.int64)

    def add(self, features, labels, index) -> None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features [n, {self.feature_dim}], got {features.shape}")
        check_finite(features, f"the {self.name} features being written")  # a diverged backbone is not cached
        features = features.astype(self.dtype, copy=False)
        if self.dtype == "float16":
            check_finite(features, f"the {self.name} features in float16 (values beyond its range)")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise LtcacheError(f"split {self.name}: label {int(labels.min())} is negative; labels are 0..C-1")
        counts = np.bincount(labels, minlength=len(self.label_counts))
        counts[: len(self.label_counts)] += self.label_counts
        self.label_counts = counts
        self.buffer.append((features, labels, np.asarray(index, dtype=np.int64)))
        self.buffered += len(features)
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        features, labels, index = (np.concatenate(parts) for parts in zip(*self.buffer, strict=True))
        self.buffer = [(features[rows:], labels[rows:], index[rows:])] if len(features) > rows else []
        self.buffered = len(features) - rows
        number = self.shard_ids[len(self.shards)] if self.shard_ids is not None else len(self.shards)
        path = self.folder / f"{number:05d}.h5"

        def write(tmp: Path) -> None:
            # Page-aligned data blocks, so a reader can memory-map the features (mapping.py).
            with h5py.File(tmp, "w", alignment_threshold=1, alignment_interval=PAGE) as f:
                f.create_dataset("features", data=features[:rows])
                f.create_dataset("labels", data=labels[:rows])
                f.create_dataset("index", data=index[:rows])

        atomic_write(path, write)
        self.seen_index.append(index[:rows])
        self.shards.append({"file": f"{self.name}/{path.name}", "rows": rows, "sha256": sha256_file(path)})
        if self.journal is not None:
            append_jsonl(self.journal, {"split": self.name, "shard": number, "labels": np.bincount(
                labels[:rows], minlength=1).tolist(), **self.shards[-1]})

    def close(self, expected_rows: int, *, expected_index: np.ndarray | None = None) -> dict:
        """Flush the remainder and check that every expected sample index (0..expected_rows-1, or `expected_index`:
        the rows this process wrote) appears exactly once."""
        if self.buffered:
            self._flush(self.buffered)
        seen = np.sort(np.concatenate(self.seen_index)) if self.seen_index else np.empty(0, np.int64)
        expected = np.arange(expected_rows) if expected_index is None else np.sort(expected_index)
        if len(seen) != len(expected) or not np.array_equal(seen, expected):
            raise LtcacheError(f"split {self.name}: extracted {len(seen)} rows but expected each of "
                               f"{len(expected)} sample indices exactly once")
        return {"rows": expected_rows, "shards": self.shards}


def check_writer_options(*, dtype: str, shard_rows: int) -> None:
    """The writer's options, checked against their declarations (options.py)."""
    check_all((DTYPE, SHARD_ROWS), {"dtype": dtype, "shard_rows": shard_rows})


class CacheWriter:
    """Builds a cache in a staging folder beside `path`; `commit` writes the manifest and swaps it into place.

    `inputs` are the command's own input files (checkpoint, feature files): `path` may not hold them.
    """

    def __init__(self, path: Path, *, feature_dim: int, dtype: str = "float32", shard_rows: int = SHARD_ROWS.default,
                 overwrite: bool = False, inputs=(), staging: Path | None = None, adopt: Path | None = None,
                 source: dict | None = None):
        check_writer_options(dtype=dtype, shard_rows=shard_rows)
        self.path = Path(path)
        # `staging`: another process's staging folder (torchrun rank > 0 writes its shards into rank 0's);
        # `adopt`: a killed extract's staging folder, continued (extract --resume).
        self.folder = StagedFolder(self.path, kind=CACHE, overwrite=overwrite, inputs=inputs, adopt=adopt,
                                   source=source) if staging is None else None
        self.staging = self.folder.path if self.folder is not None else Path(staging)
        self.feature_dim, self.dtype, self.shard_rows = feature_dim, dtype, shard_rows
        self.splits: dict[str, dict] = {}
        self.label_counts: dict[str, np.ndarray] = {}

    @staticmethod
    def check_target(path: Path, *, dtype: str, shard_rows: int, overwrite: bool, inputs=(),
                     source: dict | None = None) -> None:
        """Fail before any work when the options are bad or `path` may not be written (folders.check_target):
        `source` ({dataset, backbone}) must match an existing cache's for --overwrite to replace it."""
        check_writer_options(dtype=dtype, shard_rows=shard_rows)
        check_target(Path(path), kind=CACHE, overwrite=overwrite, inputs=inputs, source=source)

    def split(self, name: str, *, shard_ids: list[int] | None = None, journal: Path | None = None) -> SplitWriter:
        return SplitWriter(self.staging, name, feature_dim=self.feature_dim, dtype=self.dtype,
                           shard_rows=self.shard_rows, shard_ids=shard_ids, journal=journal)

    def finish_split(self, writer: SplitWriter, expected_rows: int, **about) -> None:
        """Close a split; `about` (e.g. views=K, of="train") is recorded beside its rows in the manifest."""
        self.splits[writer.name] = {**writer.close(expected_rows), **about}
        self.label_counts[writer.name] = writer.label_counts

    def add_finished(self, name: str, entry: dict, label_counts: np.ndarray) -> None:
        """Record a split whose shards other processes wrote and checked (torchrun): its manifest entry, its label
        counts (summed over the processes)."""
        self.splits[name] = entry
        self.label_counts[name] = np.asarray(label_counts, dtype=np.int64)

    def write_joint_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        weight = weight.detach().cpu().float().numpy()
        bias = bias.detach().cpu().float().numpy()
        check_head_arrays(weight, bias, num_classes=len(weight), feature_dim=self.feature_dim, where="the joint head")

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("weight", data=weight)
                f.create_dataset("bias", data=bias)

        atomic_write(self.staging / HEAD, write)

    def write_text_head(self, weight: torch.Tensor) -> None:
        """The zero-shot text head W [C, d] (class text embeddings times CLIP's logit scale), applied to the
        L2-normalized features."""
        weight = weight.detach().cpu().float().numpy()
        check_head_arrays(weight, None, num_classes=len(weight), feature_dim=self.feature_dim,
                          where="the zero-shot text head", has_bias=False)

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("weight", data=weight)

        atomic_write(self.staging / TEXT_HEAD, write)

    def write_membership(self, source_index: dict[str, np.ndarray]) -> None:
        """Per split, the position of every row (by sample index) in the dataset's source files."""

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                for split, positions in source_index.items():
                    f.create_dataset(split, data=np.asarray(positions, dtype=np.int64))

        atomic_write(self.staging / MEMBERSHIP, write)

    def _check_labels(self, class_counts: list[int]) -> None:
        """Labels within 0..C-1 in every split, and the train labels agreeing with the recorded class counts."""
        num_classes = len(class_counts)
        for name, counts in self.label_counts.items():
            if len(counts) > num_classes and counts[num_classes:].any():
                raise LtcacheError(f"split {name} has label {int(np.flatnonzero(counts)[-1])}, but there are only "
                                   f"{num_classes} classes")
        train = np.zeros(num_classes, dtype=np.int64)
        counts = self.label_counts.get("train", train)[:num_classes]
        train[: len(counts)] = counts
        if train.tolist() != list(class_counts):
            raise LtcacheError(f"the train labels give class counts {train.tolist()[:5]}... but the dataset says "
                               f"{list(class_counts)[:5]}...")

    def commit(self, *, dataset: dict, backbone: dict) -> Path:
        if "train" in self.label_counts:
            self._check_labels(dataset["train_class_counts"])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "ltcache_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "generation": uuid.uuid4().hex,  # new for every cache written: a reader notices a swap through it
            "dataset": {k: v for k, v in dataset.items() if k not in ("class_names", "train_class_counts")},
            "class_names": dataset["class_names"],
            "class_counts": dataset["train_class_counts"],
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "backbone": backbone,
            "splits": self.splits,
            "files": {name: sha256_file(self.staging / name) for name in (HEAD, MEMBERSHIP, TEXT_HEAD)
                      if (self.staging / name).is_file()},
        }
        if (self.staging / MEMBERSHIP).is_file():
            manifest["membership"] = MEMBERSHIP
        manifest["manifest_sha256"] = canonical_sha256(manifest)
        write_json(self.staging / MANIFEST, manifest)
        path = self.folder.publish()
        self.folder.close()
        return path

    def abort(self) -> None:
        if self.folder is not None:  # only the process that made the staging folder removes it
            self.folder.abort()


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
        time) and int64 labels, ordered by sample index, checked on the way.

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
        import torch

        return Split(torch.from_numpy(features), torch.from_numpy(labels))

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
        import torch

        return torch.from_numpy(weight), torch.from_numpy(bias)

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
        except (OSError, ValueError, TypeError) as exc:
            raise _damaged(where, f"it is unreadable ({type(exc).__name__})") from None
        if weight is None:
            raise _damaged(where, "it has no 'weight'")
        check_head_arrays(weight, None, num_classes=self.num_classes, feature_dim=self.feature_dim, where=where,
                          has_bias=False)
        import torch

        return LinearHead(torch.from_numpy(weight), None, normalize_input=True)

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
                for key, tensor in head.tensors().items():
                    f.create_dataset(key, data=tensor.detach().cpu().float().numpy())
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
