"""`--dataset hf`: a Hugging Face dataset on local disk, as `save_to_disk` wrote it (a DatasetDict folder) or as a
folder of parquet files (the Hub's layout: data/train-00000-of-00001.parquet, or train/*.parquet). Nothing is
downloaded: the `datasets` library memory-maps a save_to_disk folder and pyarrow reads parquet files in place.

Splits: train is `train`; val is `validation`, `val`, `valid` or `dev`, else a balanced val is carved from train
(--val-per-class, default 20); test is `test`, else the dataset's val split when it has one and was not used as val
(an error otherwise). The image column holds an Image feature (a struct of bytes and path), or raw bytes, or a
path relative to --root; labels are integers from 0, their names from the ClassLabel feature when there is one.
Sample indices are the rows' positions in their split, so torchrun ranks and --resume work as for image files.

Needs the optional extra: pip install 'ltcache[hf]'.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.data.datasets import LongTailData, register_dataset
from ltcache.data.profiles import carve_splits
from ltcache.data.spec import DatasetSpec

VAL_NAMES = ("validation", "val", "valid", "dev")
HF_EXTRA = "hf datasets need the hf extra (the datasets library and pyarrow); pip install 'ltcache[hf]'"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LtcacheError(HF_EXTRA) from None
    return pyarrow


def read_splits(root: Path) -> tuple[dict, dict]:
    """({split name: pyarrow Table}, the Hugging Face features description or {}) of a save_to_disk folder or a folder
    of parquet files."""
    pa = _pyarrow()
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        try:
            import datasets
        except ImportError:
            raise LtcacheError(HF_EXTRA) from None
        try:
            loaded = datasets.load_from_disk(str(root))
        except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
            raise LtcacheError(f"--root {root} is not a readable save_to_disk folder ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:120]})") from None
        if isinstance(loaded, datasets.Dataset):
            raise LtcacheError(f"--root {root} holds one split; save a DatasetDict with train and test splits "
                               "(DatasetDict({'train': ..., 'test': ...}).save_to_disk(PATH))")
        features = {name: split.features.to_dict() for name, split in loaded.items()}
        return {name: split.data.table for name, split in loaded.items()}, next(iter(features.values()), {})
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise LtcacheError(f"--root {root} holds neither a save_to_disk dataset (dataset_dict.json) nor parquet files; "
                           "point it at one")
    grouped: dict[str, list[Path]] = {}
    for file in files:
        grouped.setdefault(_split_of(file, root), []).append(file)
    tables, features = {}, {}
    for name, members in grouped.items():
        try:
            parts = [pa.parquet.read_table(member) for member in members]
            tables[name] = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        except (OSError, pa.ArrowException) as exc:
            raise LtcacheError(f"cannot read the parquet files of split {name} under {root} ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:120]})") from None
        metadata = (tables[name].schema.metadata or {}).get(b"huggingface")
        if metadata and not features:
            try:
                features = json.loads(metadata).get("info", {}).get("features", {}) or {}
            except ValueError:
                features = {}
    return tables, features


def _split_of(file: Path, root: Path) -> str:
    """The split a parquet file belongs to: its name's prefix before '-' (train-00000-of-00001.parquet), else its
    folder's name (train/part.parquet)."""
    stem = file.stem.split("-")[0].split(".")[0]
    if stem in ("train", "test", *VAL_NAMES):
        return stem
    parent = file.parent.name
    if file.parent != root and parent in ("train", "test", *VAL_NAMES):
        return parent
    return stem


def class_names_of(features: dict, label_column: str, labels: list[np.ndarray]) -> list[str]:
    """The ClassLabel names of the label column, or the label values as text."""
    feature = features.get(label_column) if isinstance(features, dict) else None
    names = feature.get("names") if isinstance(feature, dict) else None
    count = int(max(int(split.max()) for split in labels if len(split))) + 1
    if isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) >= count:
        return list(names)
    return [str(k) for k in range(count)]


def _labels(table, column: str, split: str, root: Path) -> np.ndarray:
    if column not in table.column_names:
        raise LtcacheError(f"split {split} under {root} has no label column {column!r}; its columns are "
                           f"{', '.join(table.column_names)} (pass --label-column)")
    values = table.column(column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "iu" or (len(values) and values.min() < 0):
        raise LtcacheError(f"the {column!r} column of split {split} under {root} must hold class numbers 0, 1, ...; "
                           f"found {values.dtype} values such as {values[:3].tolist()}")
    return values.astype(np.int64)


def _images(table, column: str, split: str, root: Path):
    if column not in table.column_names:
        raise LtcacheError(f"split {split} under {root} has no image column {column!r}; its columns are "
                           f"{', '.join(table.column_names)} (pass --image-column)")
    return table.column(column)


@register_dataset("hf")
def build_hf(spec: DatasetSpec) -> LongTailData:
    """A Hugging Face dataset on local disk (module docstring): its train split as given (or, with --profile
    exponential|step, subsampled to a long tail), val as found or carved from train, test as found."""
    from ltcache.data.files import PROFILES, imagenet_transforms
    from ltcache.data.images import ArrowImageDataset

    if not spec.root:
        raise LtcacheError("--dataset hf needs --root: a save_to_disk folder or a folder of parquet files")
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise LtcacheError(f"--root {root} is not a folder; point it at a save_to_disk folder or parquet files")
    spec = replace(spec, root=str(root), image_size=spec.image_size or 224, profile=spec.profile or "none",
                   val_per_class=20 if spec.val_per_class is None else spec.val_per_class)
    tables, features = read_splits(root)
    if "train" not in tables:
        raise LtcacheError(f"--root {root} has no train split (its splits: {', '.join(sorted(tables))})")
    val_name = next((name for name in VAL_NAMES if name in tables), None)
    test_name = "test" if "test" in tables else None
    if test_name is None:
        raise LtcacheError(f"--root {root} has no test split (its splits: {', '.join(sorted(tables))}); save one as "
                           "'test'")
    labels = {name: _labels(tables[name], spec.label_column, name, root) for name in ("train", val_name, test_name)
              if name}
    class_names = class_names_of(features, spec.label_column, list(labels.values()))
    columns = {name: _images(tables[name], spec.image_column, name, root) for name in labels}
    train_labels = labels["train"]
    counts = np.bincount(train_labels, minlength=len(class_names))
    carve_val = 0 if val_name else spec.val_per_class
    if (counts <= carve_val).any():
        short = int(np.argmin(counts))
        raise LtcacheError(f"class {class_names[short]!r} has {counts[short]} train rows, not enough to carve a val "
                           f"split of {carve_val} per class; save a validation split or lower --val-per-class")
    available = counts - carve_val
    if spec.profile == "none":
        train_counts = available.tolist()
    else:
        spec = replace(spec, imbalance_factor=spec.imbalance_factor or 100.0, n_max=spec.n_max or int(available.max()))
        train_counts = PROFILES[spec.profile](len(class_names), spec.n_max, spec.imbalance_factor)
    positions = carve_splits(train_labels, train_counts=train_counts, val_per_class=carve_val, test_per_class=0,
                             seed=spec.seed)
    train_tf, test_tf = imagenet_transforms(spec.image_size)
    rows = {"train": ("train", positions["train"])}
    rows["val"] = (val_name, np.arange(len(labels[val_name]))) if val_name else ("train", positions["val"])
    rows["test"] = (test_name, np.arange(len(labels[test_name])))
    splits, split_labels = {}, {}
    for split, (source, where) in rows.items():
        split_labels[split] = labels[source][where]
        splits[split] = ArrowImageDataset(columns[source], where, split_labels[split],
                                          train_tf if split == "train" else test_tf, root)
    source_index = {split: np.asarray(where, dtype=np.int64) for split, (_, where) in rows.items()}
    return LongTailData(spec, class_names, splits, split_labels, source_index, in_channels=3,
                        image_size=spec.image_size,
                        extra={"hf_splits": {split: source for split, (source, _) in rows.items()},
                               "val_carved_from_train": val_name is None})
