"""`ltcache import-features`: a cache from features computed elsewhere (CLIP, DINOv2, timm, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ltcache.cache import CacheWriter
from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import read_class_names, sha256_file
from ltcache.core.options import SHARD_ROWS
from ltcache.core.params import MAX_CLASSES, checked
from ltcache.stage1.config import IMPORT_FEATURES


def _load_arrays(path: Path, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`keys` (required) and `optional` from an .npz or a .pt dict; an .npy holds the first key, and its sibling
    NAME.labels.npy the second."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"{path} not found")
    pickled = LtcacheError(f"{path} holds pickled Python objects, which ltcache never loads (unpickling can run code); "
                           "save plain numeric arrays, e.g. np.savez(path, features=..., labels=...)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                found = {k: archive[k] for k in (*keys, *optional) if k in archive}
        elif path.suffix == ".pt":
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch's own message advises unpickling: never repeat that advice
                if "weights_only" in str(exc) or "pickle" in type(exc).__name__.lower():
                    raise pickled from None
                raise LtcacheError(f"cannot read {path} ({type(exc).__name__}); save it with torch.save of a dict of "
                                   "tensors, or as .npz") from None
            if not isinstance(state, dict):
                raise LtcacheError(f"{path} must hold a dict with {', '.join(keys)}")
            try:
                found = {k: torch.as_tensor(state[k]).numpy() for k in (*keys, *optional) if k in state}
            except (TypeError, ValueError, RuntimeError):
                raise LtcacheError(f"{path}: {', '.join(keys)} must be tensors or numeric arrays") from None
        elif path.suffix == ".npy":
            found = {keys[0]: np.load(path, allow_pickle=False)}
            labels = path.with_suffix(".labels.npy")
            if len(keys) > 1 and labels.is_file():
                found[keys[1]] = np.load(labels, allow_pickle=False)
        else:
            raise LtcacheError(f"{path}: use .npz, .pt or .npy (features, with labels in NAME.labels.npy)")
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise pickled from None
        raise LtcacheError(f"cannot read {path} ({type(exc).__name__}); write it with np.save / np.savez or "
                           "torch.save") from None
    for key, value in found.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            raise LtcacheError(f"{path}: {key!r} must be a numeric array, got "
                               f"{getattr(value, 'dtype', type(value).__name__)}")
    missing = [k for k in keys if k not in found]
    if missing:
        hint = f" (for .npy, put them in {path.with_suffix('.labels.npy').name})" if path.suffix == ".npy" else ""
        raise LtcacheError(f"{path} has no {missing[0]!r} array{hint}")
    return found


def _check_split(name: str, path: Path, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise LtcacheError(f"{path}: features must be [n, d] and labels [n]; got {features.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LtcacheError(f"{path}: labels must be integers, got {labels.dtype}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= MAX_CLASSES):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise LtcacheError(f"{path}: label {bad} is outside 0..{MAX_CLASSES - 1}; labels are class numbers counted "
                           "from 0")
    if not np.isfinite(features).all():
        raise LtcacheError(f"{path}: the {name} features contain NaN or infinite values")
    return features.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


@checked(*IMPORT_FEATURES)
def import_features(out: Path, *, train: Path, test: Path, val: Path | None = None, head: Path | None = None,
                    class_names: Path | None = None, dtype: str = "float32", overwrite: bool = False,
                    seed: int = 0) -> Path:
    """Write a schema-v1 cache from per-split feature files. Without `head`, the joint head is a linear
    classifier fitted on the imported train features with instance-balanced sampling (a linear probe)."""
    sources = {"train": train, "val": val, "test": test}
    inputs = [train, val, test, head, class_names]
    source = {"dataset": "imported", "backbone": "imported"}
    CacheWriter.check_target(out, dtype=dtype, shard_rows=SHARD_ROWS.default, overwrite=overwrite, inputs=inputs,
                             source=source)
    splits = {}
    for name, path in sources.items():
        if path is not None:
            arrays = _load_arrays(path, ("features", "labels"))
            splits[name] = _check_split(name, path, arrays["features"], arrays["labels"])
    dims = {name: f.shape[1] for name, (f, _) in splits.items()}
    if len(set(dims.values())) != 1:
        raise LtcacheError(f"the splits have different feature dimensions: {dims}")
    num_classes = int(splits["train"][1].max()) + 1
    counts = np.bincount(splits["train"][1], minlength=num_classes)
    if (counts == 0).any() or min(labels.min() for _, labels in splits.values()) < 0:
        raise LtcacheError(f"train labels must cover 0..{num_classes - 1}: class {int(np.argmin(counts))} has no "
                           "train sample (or a label is negative)")
    for name, (_, labels) in splits.items():
        if labels.max() >= num_classes:
            raise LtcacheError(f"{sources[name]}: label {labels.max()} is not a train class (0..{num_classes - 1})")
    names = _class_names(class_names, num_classes)
    weight, bias, head_source = _joint_head(head, splits["train"], num_classes, dims["train"], seed)

    writer = CacheWriter(out, feature_dim=dims["train"], dtype=dtype, overwrite=overwrite, inputs=inputs,
                         source=source)
    try:
        for name, (features, labels) in splits.items():
            split = writer.split(name)
            split.add(features, labels, np.arange(len(labels)))
            writer.finish_split(split, len(labels))
        writer.write_joint_head(weight, bias)
        files = {name: {"path": str(Path(p).resolve()), "sha256": sha256_file(Path(p))}
                 for name, p in sources.items() if p is not None}
        dataset = {"name": "imported", "provenance": "imported", "source_files": files, "num_classes": num_classes,
                   "class_names": names, "train_class_counts": counts.tolist(),
                   "split_rows": {n: len(labels) for n, (_, labels) in splits.items()}}
        backbone = {"arch": "imported", "provenance": "imported", "joint_head": head_source}
        return writer.commit(dataset=dataset, backbone=backbone)
    except BaseException:
        writer.abort()
        raise


def _class_names(path: Path | None, num_classes: int) -> list[str]:
    return [str(c) for c in range(num_classes)] if path is None else read_class_names(path, num_classes)


def _joint_head(path: Path | None, train, num_classes: int, dim: int, seed: int):
    if path is not None:
        arrays = _load_arrays(path, ("weight",), optional=("bias",))
        weight = torch.as_tensor(arrays["weight"], dtype=torch.float32)
        bias = torch.as_tensor(arrays.get("bias", np.zeros(num_classes)), dtype=torch.float32)
        if tuple(weight.shape) != (num_classes, dim) or tuple(bias.shape) != (num_classes,):
            raise LtcacheError(f"{path}: weight must be [{num_classes}, {dim}] and bias [{num_classes}]; got "
                               f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        return weight, bias, {"source": "imported", "path": str(Path(path).resolve())}
    return linear_probe(torch.from_numpy(train[0]), torch.from_numpy(train[1]), num_classes, seed)


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int):
    """(weight, bias, about) of a linear classifier fitted on `features` with cRT's schedule (10 epochs, the same
    defaults) but instance-balanced batches: a plain linear probe, the joint head of a model that has none for the
    dataset's classes."""
    from ltcache.fitting import BALANCED_DEFAULTS, train_on_features

    torch.manual_seed(seed)
    linear = torch.nn.Linear(features.shape[1], num_classes)
    used = train_on_features(linear, features, labels, epochs=10, seed=seed, sampling_q=1.0, **BALANCED_DEFAULTS)
    return linear.weight.detach(), linear.bias.detach(), {"source": "fitted: instance-balanced linear probe", **used}

