"""`--dataset webdataset`: WebDataset tar shards, the format large-scale vision pipelines store images in.

A sample is the tar members that share a key (the name up to the first dot): one image (KEY.jpg / .jpeg / .png /
.webp / ...) and its label, KEY.cls (an integer as text, what the `webdataset` package's TarWriter writes for "cls")
or KEY.json ({"label": int}). Shards are found per split as ROOT/train/*.tar or ROOT/train-*.tar (likewise val and
test), read in name order; a sample's index is its position in that order, so the cache is the same whichever
process extracts it.

The member headers are read once (tar headers only: no image is decoded), and each image is then read at its
offset. That random access is what lets torchrun ranks take whole cache shards and `extract --resume` redo only the
missing ones, exactly as for image files; streaming the tars (the `webdataset` package's own reader) could do
neither without reading every tar before a rank's rows. So no extra package is needed to read them; compressed
shards (.tar.gz) have no offsets to seek to and are refused with the command that decompresses them.

Without a val split, a balanced one is carved from train (--val-per-class, default 1), as for iNaturalist.
Class names come from ROOT/classes.txt (one per line) when it exists.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import read_lines
from ltcache.core.params import MAX_CLASSES
from ltcache.data.datasets import DatasetSpec, LongTailData, register_dataset
from ltcache.data.files import IMAGE_EXTENSIONS, _root, carve_val, check_labels, imagenet_transforms

LABEL_EXTENSIONS = (".cls", ".json")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def split_shards(root: Path, split: str) -> list[Path]:
    """The tar shards of `split`: ROOT/split/*.tar, else ROOT/split-*.tar, in name order."""
    folder = root / split
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else sorted(root.glob(f"{split}-*.tar"))
    compressed = sorted(p for pattern in COMPRESSED for p in
                        (folder.glob(f"*{pattern}") if folder.is_dir() else root.glob(f"{split}-*{pattern}")))
    if compressed and not shards:
        raise LtcacheError(f"{compressed[0]} is compressed, and ltcache reads tar members at their offsets; "
                           f"decompress the shards first (e.g. gunzip -k {compressed[0].parent}/*.gz)")
    return shards


def index_shard(path: Path) -> tuple[list[tuple[int, int, str]], list[int]]:
    """(image members as (offset, size, name), labels), one per sample in tar order. Reads headers and the small
    label members only."""
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            short = next((m for m in members if m.offset_data + m.size > size), None)
            if short is not None:
                raise tarfile.ReadError(f"{short.name} runs past the end of the file (truncated)")
            samples: dict[str, dict] = {}
            for member in members:
                base = member.name.rsplit("/", 1)[-1]
                key, dot, extension = base.partition(".")
                if not dot or key.startswith("_"):
                    continue
                key = member.name[: len(member.name) - len(base)] + key  # the folder is part of the key
                entry = samples.setdefault(key, {})
                extension = "." + extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    entry["image"] = (member.offset_data, member.size, member.name)
                elif extension in LABEL_EXTENSIONS:
                    entry["label"] = (extension, tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as exc:
        raise LtcacheError(f"cannot read tar shard {path} ({type(exc).__name__}: {exc}); replace or remove "
                           "it") from None
    images, labels = [], []
    for key, entry in samples.items():
        if "image" not in entry or "label" not in entry:
            missing = "image (.jpg, .png, ...)" if "image" not in entry else "label (.cls or .json)"
            raise LtcacheError(f"sample {key!r} in {path} has no {missing}; every key needs both")
        images.append(entry["image"])
        labels.append(_label(*entry["label"], key, path))
    return images, labels


def _label(extension: str, raw: bytes, key: str, path: Path) -> int:
    try:
        value = json.loads(raw.decode("utf-8"))
        if extension == ".json":
            value = value["label"] if isinstance(value, dict) else None
    except (ValueError, KeyError, RecursionError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_CLASSES:
        raise LtcacheError(f"sample {key!r} in {path}: its {extension} label {raw[:40]!r} is not an integer from 0 "
                           f"to {MAX_CLASSES - 1}")
    return value


@register_dataset("webdataset")
def build_webdataset(spec: DatasetSpec) -> LongTailData:
    """WebDataset tar shards under --root: train and test, and val (else carved from train)."""
    root = _root(spec)
    spec = replace(spec, root=str(root), image_size=spec.image_size or 224)
    shards = {split: split_shards(root, split) for split in ("train", "val", "test")}
    for split in ("train", "test"):
        if not shards[split]:
            raise LtcacheError(f"--root {root} has no {split} shards; expected {root}/{split}/*.tar or "
                               f"{root}/{split}-*.tar (WebDataset format: KEY.jpg + KEY.cls per sample)")
    files = [str(path) for split in shards for path in shards[split]]
    members, labels = {}, {}
    for split, paths in shards.items():
        split_members, split_labels = [], []
        for path in paths:
            images, shard_labels = index_shard(path)
            number = files.index(str(path))
            split_members += [(number, offset, size, name) for offset, size, name in images]
            split_labels += shard_labels
        if paths and not split_members:
            raise LtcacheError(f"the {split} shards under {root} hold no samples")
        members[split], labels[split] = split_members, np.asarray(split_labels, dtype=np.int64)
    positions = {split: np.arange(len(labels[split])) for split in labels}
    extra = {"shards": {split: [str(p) for p in paths] for split, paths in shards.items()}}
    if not shards["val"]:
        del members["val"], labels["val"], positions["val"]
        spec = carve_val(spec, members, labels, positions)
        extra["selection_split"] = f"val: {spec.val_per_class} per class carved from the train shards"
    num_classes = int(labels["train"].max()) + 1
    check_labels(labels, num_classes, {split: root for split in labels})
    names_file = root / "classes.txt"
    class_names = [str(c) for c in range(num_classes)]
    if names_file.is_file():
        listed = read_lines(names_file, "class-names file")
        if len(listed) != num_classes:
            raise LtcacheError(f"{names_file} names {len(listed)} classes but the train labels have {num_classes}")
        class_names = listed
    from ltcache.data.images import TarImageDataset

    train_tf, test_tf = imagenet_transforms(spec.image_size)
    splits = {split: TarImageDataset(files, members[split], labels[split], train_tf if split == "train" else test_tf)
              for split in members}
    return LongTailData(spec, class_names, splits, labels, positions, in_channels=3, image_size=spec.image_size,
                        extra=extra)
