"""Writing a cache: shards of `shard_rows` rows per split (SplitWriter), journalled as they finish, and the
CacheWriter that builds the whole cache in a staging folder beside its target and publishes it by writing the
manifest last (the commit point)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ltcache._version import __version__
from ltcache.cache.schema import (
    HEAD,
    MANIFEST,
    MEMBERSHIP,
    SCHEMA_VERSION,
    TEXT_HEAD,
    check_finite,
    check_head_arrays,
    shard_file,
)
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import CACHE, StagedFolder, check_target
from ltcache.core.fsutil import append_jsonl, atomic_write, canonical_sha256, sha256_file, write_json
from ltcache.core.mapping import PAGE
from ltcache.core.options import DTYPE, SHARD_ROWS
from ltcache.core.params import check_all

if TYPE_CHECKING:
    import torch


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
        path = self.folder.parent / shard_file(self.name, number)

        def write(tmp: Path) -> None:
            # Page-aligned data blocks, so a reader can memory-map the features (mapping.py).
            with h5py.File(tmp, "w", alignment_threshold=1, alignment_interval=PAGE) as f:
                f.create_dataset("features", data=features[:rows])
                f.create_dataset("labels", data=labels[:rows])
                f.create_dataset("index", data=index[:rows])

        atomic_write(path, write)
        self.seen_index.append(index[:rows])
        self.shards.append({"file": shard_file(self.name, number), "rows": rows, "sha256": sha256_file(path)})
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

    def write_text_head(self, weight: torch.Tensor, projection: torch.Tensor | None = None) -> None:
        """The zero-shot text head W [C, d] (class text embeddings times CLIP's logit scale), applied to the
        L2-normalized features; with `projection` [feature_dim, d] (extract --features both), to the normalized
        projected features f @ projection."""
        weight = weight.detach().cpu().float().numpy()
        width = self.feature_dim
        if projection is not None:
            projection = projection.detach().cpu().float().numpy()
            if projection.shape[0] != self.feature_dim or not np.isfinite(projection).all():
                raise LtcacheError(f"the projection {projection.shape} does not map the {self.feature_dim}-d features")
            width = projection.shape[1]
        check_head_arrays(weight, None, num_classes=len(weight), feature_dim=width,
                          where="the zero-shot text head", has_bias=False)

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("weight", data=weight)
                if projection is not None:
                    f.create_dataset("projection", data=projection)

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

    def commit(self, *, dataset: dict, backbone: dict, test_crops: dict | None = None) -> Path:
        """Write the manifest (the cache's commit point) and publish the staging folder; `test_crops`: the geometry
        of the val_crops / test_crops splits (extract --test-crops)."""
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
        if test_crops is not None:
            manifest["test_crops"] = test_crops
        manifest["manifest_sha256"] = canonical_sha256(manifest)
        write_json(self.staging / MANIFEST, manifest)
        path = self.folder.publish()
        self.folder.close()
        return path

    def read_split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows of split `name` written so far to the staging folder (features float32 [n, d], labels [n]), in
        sample-index order, read back shard by shard: what a linear probe on the written train rows fits on."""
        entry = self.splits[name]
        features = np.empty((entry["rows"], self.feature_dim), dtype=np.float32)
        labels = np.empty(entry["rows"], dtype=np.int64)
        for shard in entry["shards"]:
            with h5py.File(self.staging / shard["file"], "r") as f:
                index = f["index"][:]
                features[index] = f["features"][:]
                labels[index] = f["labels"][:]
        return features, labels

    def abort(self) -> None:
        if self.folder is not None:  # only the process that made the staging folder removes it
            self.folder.abort()


def open_writer(out: Path, feature_dim: int, writer_args: dict, *, adopt: Path | None = None) -> CacheWriter:
    """Rank 0 makes the staging folder; under torchrun the other ranks write their shards into it (its path is
    broadcast, or rank 0's error, so that no rank waits on a folder that was never made)."""
    import torch.distributed as dist

    from ltcache.core.distributed import barrier, get_rank, get_world_size

    if get_world_size() == 1:
        return CacheWriter(out, feature_dim=feature_dim, adopt=adopt, **writer_args)
    message: list = [None]
    writer = None
    barrier()  # every rank has checked the target (check_target refuses a live staging folder) before it exists
    if get_rank() == 0:
        try:
            writer = CacheWriter(out, feature_dim=feature_dim, adopt=adopt, **writer_args)
            message = [("ok", str(writer.staging))]
        except LtcacheError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    kind, text = message[0]
    if kind == "error":
        raise LtcacheError(text)
    return writer if writer is not None else CacheWriter(out, feature_dim=feature_dim, staging=Path(text),
                                                         **writer_args)
