"""Datasets of image files: the split-file benchmarks (ImageNet-LT, Places-LT, iNaturalist 2018) and ImageFolder."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError, unknown_name
from ltcache.core.fsutil import read_text
from ltcache.core.params import MAX_CLASSES
from ltcache.data.datasets import DatasetSpec, LongTailData, register_dataset
from ltcache.data.profiles import PROFILES, carve_splits

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)  # the official code's iNaturalist statistics
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def imagenet_transforms(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, jitter: bool = True):
    """(train, test): RandomResizedCrop + flip (+ the official colour jitter, which the official code uses for
    ImageNet-LT and Places-LT but not for iNaturalist); Resize(256/224 * size) + CenterCrop."""
    import torch
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    colour = [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)] if jitter else []
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *colour, *to_tensor])
    test = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size), *to_tensor])
    return train, test


def read_split_file(path: Path, root: Path) -> tuple[list[str], np.ndarray]:
    """Parse `relative/path label` lines; paths must stay under `root` and exist."""
    if not path.is_file():
        raise LtcacheError(f"split file {path} not found; pass --split-dir to the folder that holds it")
    root_text = os.path.normpath(os.path.abspath(root))
    paths, labels = [], []
    for number, line in enumerate(read_text(path, "split file").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise LtcacheError(f"{path}:{number}: expected 'relative/path label', got {line.strip()!r}")
        relative, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise LtcacheError(f"{path}:{number}: label {label_text!r} is not an integer") from None
        if not 0 <= label < MAX_CLASSES:
            raise LtcacheError(f"{path}:{number}: label {label} is outside 0..{MAX_CLASSES - 1}; labels are class "
                               "numbers counted from 0")
        full = os.path.normpath(os.path.join(root_text, relative.strip()))
        if os.path.isabs(relative.strip()) or not full.startswith(root_text + os.sep):
            raise LtcacheError(f"{path}:{number}: path {relative.strip()!r} escapes --root {root}")
        paths.append(full)
        labels.append(label)
    if not paths:
        raise LtcacheError(f"split file {path} has no entries")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise LtcacheError(f"{len(missing)} image(s) listed in {path} are missing under --root {root}, "
                           f"e.g. {missing[0]}")
    return paths, np.asarray(labels, dtype=np.int64)


def check_labels(labels: dict[str, np.ndarray], num_classes: int, source: dict[str, Path]) -> None:
    """Every class needs a train image; val/test labels must be classes that train knows."""
    counts = np.bincount(labels["train"], minlength=num_classes)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        raise LtcacheError(f"class {empty[0]} has no training images in {source['train']} "
                           f"({len(empty)} class(es) empty); fix the split file")
    for split, split_labels in labels.items():
        if split_labels.max() >= num_classes:
            raise LtcacheError(f"{source[split]}: label {split_labels.max()} is out of range 0..{num_classes - 1} "
                               "(the classes of the train split)")


# name -> (split file per split, mean, std, colour jitter in training); iNaturalist has no test split: its val file
# is the reporting split, and the official code trains it without colour jitter.
SPLIT_FILE_DATASETS = {
    "imagenet-lt": ({"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
                    IMAGENET_MEAN, IMAGENET_STD, True),
    "places-lt": ({"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
                  IMAGENET_MEAN, IMAGENET_STD, True),
    "inat2018": ({"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"}, INAT_MEAN, INAT_STD, False),
}


def carve_val(spec: DatasetSpec, items: dict[str, list], labels: dict[str, np.ndarray],
              positions: dict[str, np.ndarray]) -> DatasetSpec:
    """Carve a balanced selection split from train (--val-per-class, default 1), so that tau and every other choice
    never see the reporting split: `items` (image paths, tar members, ...), `labels` and `positions` gain "val" (unless
    --val-per-class 0) and train loses those rows. Returns the spec with val_per_class resolved."""
    spec = replace(spec, val_per_class=1 if spec.val_per_class is None else spec.val_per_class)
    counts = np.bincount(labels["train"], minlength=int(labels["train"].max()) + 1)
    if spec.val_per_class and counts.min() <= spec.val_per_class:
        raise LtcacheError(f"--val-per-class {spec.val_per_class} would leave a class of {spec.name} with no "
                           f"training image (smallest class: {counts.min()}); lower it")
    carved = carve_splits(labels["train"], train_counts=(counts - spec.val_per_class).tolist(),
                          val_per_class=spec.val_per_class, test_per_class=0, seed=spec.seed)
    train_items, train_labels = items["train"], labels["train"]
    for split, where in carved.items():  # "train" and (unless --val-per-class 0) "val"
        items[split] = [train_items[i] for i in where]
        labels[split] = train_labels[where]
        positions[split] = where
    return spec


def _root(spec: DatasetSpec) -> Path:
    if not spec.root:
        raise LtcacheError(f"{spec.name} needs --root, the folder its image paths are relative to")
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise LtcacheError(f"--root {root} is not a folder; point it at the {spec.name} images")
    return root


def _assemble(spec, class_names, paths, labels, source_index, transforms, **extra) -> LongTailData:
    from ltcache.data.images import FileImageDataset

    train_tf, test_tf = transforms
    splits = {split: FileImageDataset(paths[split], labels[split], train_tf if split == "train" else test_tf)
              for split in paths}
    return LongTailData(spec, class_names, splits, labels, source_index, in_channels=3,
                        image_size=spec.image_size, extra=extra)


def _class_names_from_paths(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """The parent folder of each class's first train image (n01440764, airfield, 7477, ...)."""
    names = [""] * num_classes
    for path, label in zip(paths, labels, strict=True):
        if not names[label]:
            names[label] = Path(path).parent.name
    return names


def build_split_file_dataset(spec: DatasetSpec) -> LongTailData:
    """The official split files (ImageNet-LT, Places-LT, iNaturalist 2018) under --split-dir, images under --root."""
    files, mean, std, jitter = SPLIT_FILE_DATASETS[spec.name]
    root = _root(spec)
    split_dir = Path(spec.split_dir).expanduser() if spec.split_dir else root
    spec = replace(spec, root=str(root), split_dir=str(split_dir), image_size=spec.image_size or 224)
    source = {split: split_dir / name for split, name in files.items()}
    paths, labels = {}, {}
    for split, path in source.items():
        paths[split], labels[split] = read_split_file(path, root)
    positions = {split: np.arange(len(labels[split])) for split in labels}
    extra = {"split_files": {split: str(path) for split, path in source.items()}}
    if "val" not in files:
        spec = carve_val(spec, paths, labels, positions)
        extra["selection_split"] = f"val: {spec.val_per_class} per class carved from {files['train']}"
    num_classes = int(labels["train"].max()) + 1
    check_labels(labels, num_classes, {**source, "val": source.get("val", source["train"])})
    class_names = _class_names_from_paths(paths["train"], labels["train"], num_classes)
    transforms = imagenet_transforms(spec.image_size, mean, std, jitter=jitter)
    return _assemble(spec, class_names, paths, labels, positions, transforms, **extra)


for _name in SPLIT_FILE_DATASETS:
    register_dataset(_name)(build_split_file_dataset)


def inat_json_to_split_files(json_dir: Path, out_dir: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Turn iNaturalist 2018's train2018.json / val2018.json into iNaturalist18_{train,val}.txt."""
    written = {}
    out_dir, json_dir = Path(out_dir), Path(json_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LtcacheError(f"--out {out_dir} is a file; pass the folder for the split files")
    targets = {"train": out_dir / "iNaturalist18_train.txt", "val": out_dir / "iNaturalist18_val.txt"}
    for target in targets.values():
        if target.exists() and (target.is_symlink() or not target.is_file()):
            raise LtcacheError(f"{target} exists and is not a plain file; move it away or choose another --out")
    existing = [p for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise LtcacheError(f"{existing[0]} already exists; choose another --out or pass --overwrite")
    sources = {split: json_dir / f"{split}2018.json" for split in ("train", "val")}
    if existing:
        _check_ours(out_dir / INAT_MARKER, existing, sources)
    lines = {}
    for split in ("train", "val"):
        path = json_dir / f"{split}2018.json"
        if not path.is_file():
            raise LtcacheError(f"{path} not found; point at the folder with train2018.json and val2018.json")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            files = {image["id"]: image["file_name"] for image in data["images"]}
            lines[split] = [f"{files[a['image_id']]} {a['category_id']}" for a in data["annotations"]]
        except (ValueError, KeyError, TypeError) as exc:  # JSON and UTF-8 decoding errors are ValueErrors
            raise LtcacheError(f"{path} is not an iNaturalist json ({type(exc).__name__}); pass the folder with the "
                               "official train2018.json and val2018.json") from None
    from ltcache.core.folders import folder_lock
    from ltcache.core.fsutil import atomic_write, sha256_file, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, shared=False, what="split folder"):
        if existing:  # again under the lock: another process may have written meanwhile
            _check_ours(out_dir / INAT_MARKER, [p for p in targets.values() if p.exists()], sources)
        for split, target in targets.items():
            atomic_write(target, lambda tmp, text="\n".join(lines[split]) + "\n": tmp.write_text(text))
            written[split] = target
        write_json(out_dir / INAT_MARKER, {
            "made_by": "ltcache inat-splits",
            "sources": {split: sha256_file(path) for split, path in sources.items()},
            "files": {target.name: sha256_file(target) for target in targets.values()}})
    return written


INAT_MARKER = "iNaturalist18.ltcache.json"  # which split files inat-splits wrote here, from which json files


def _check_ours(marker: Path, existing: list[Path], sources: dict[str, Path]) -> None:
    """--overwrite replaces a split file only when inat-splits wrote it (its sha256 is in the marker) from the same
    json files: a user's own copy (say the official iNaturalist18_train.txt) is never replaced."""
    from ltcache.core.fsutil import sha256_file

    try:
        recorded = json.loads(marker.read_bytes().decode("utf-8"))
        files, recorded_sources = recorded["files"], recorded["sources"]
        if not isinstance(files, dict) or not isinstance(recorded_sources, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise LtcacheError(f"{existing[0]} was not written by ltcache inat-splits (no {marker.name} beside it); "
                           "--overwrite only replaces what ltcache made, so choose another --out") from None
    for path in existing:
        if files.get(path.name) != sha256_file(path):
            raise LtcacheError(f"{path} was changed since ltcache inat-splits wrote it (or was not written by it); "
                               "--overwrite only replaces what ltcache made, so choose another --out")
    for split, source in sources.items():
        if source.is_file() and recorded_sources.get(split) != sha256_file(source):
            raise LtcacheError(f"the split files in {marker.parent} were made from another {source.name}; choose "
                               "another --out for this one")


@register_dataset("imagefolder")
def build_imagefolder(spec: DatasetSpec) -> LongTailData:
    """Any ImageFolder tree: ROOT/train/<class>/* and ROOT/test/<class>/* (or val/), or one ROOT/<class>/* tree.

    With one tree, a balanced test split (20 per class) is carved first. --profile exponential|step subsamples
    train to a long tail (n_max, imbalance factor); a balanced val (--val-per-class, default 20) comes from train
    images the profile leaves unused.
    """
    root = _root(spec)
    spec = replace(spec, root=str(root), image_size=spec.image_size or 224,
                   val_per_class=20 if spec.val_per_class is None else spec.val_per_class,
                   profile=spec.profile or "none")
    if spec.profile not in (*PROFILES, "none"):
        raise unknown_name("profile", spec.profile, [*PROFILES, "none"])
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None) if train_dir != root else None
    class_names = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not class_names:
        raise LtcacheError(f"{train_dir} has no class folders; expected ImageFolder layout ROOT/<class>/<image>")
    pool_paths, pool_labels = _scan_tree(train_dir, class_names)
    counts = np.bincount(pool_labels, minlength=len(class_names))
    if (counts == 0).any():
        raise LtcacheError(f"class {class_names[int(np.argmin(counts))]!r} has no training images in {train_dir}")
    test_per_class = 0 if test_dir else 20
    available = counts - test_per_class - spec.val_per_class
    if spec.profile == "none":
        train_counts = available.tolist()
    else:
        spec = replace(spec, imbalance_factor=spec.imbalance_factor or 100.0, n_max=spec.n_max or int(available.max()))
        train_counts = PROFILES[spec.profile](len(class_names), spec.n_max, spec.imbalance_factor)
    positions = carve_splits(pool_labels, train_counts=train_counts, val_per_class=spec.val_per_class,
                             test_per_class=test_per_class, seed=spec.seed)
    paths = {split: [pool_paths[i] for i in where] for split, where in positions.items()}
    labels = {split: pool_labels[where] for split, where in positions.items()}
    if test_dir:
        paths["test"], labels["test"] = _scan_tree(test_dir, class_names)
        positions["test"] = np.arange(len(labels["test"]))
    return _assemble(spec, class_names, paths, labels, positions, imagenet_transforms(spec.image_size),
                     train_folder=str(train_dir), test_folder=str(test_dir) if test_dir else None)


def _scan_tree(folder: Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)
