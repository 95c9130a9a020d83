"""Dataset registry: each builder turns a `DatasetSpec` into long-tailed train / balanced val / test splits."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.data.profiles import carve_splits, exponential_profile
from ltcache.data.spec import DATASETS, DatasetSpec

if TYPE_CHECKING:
    from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


@dataclass
class LongTailData:
    """The three splits of a long-tailed dataset, plus everything the manifest records about them."""

    spec: DatasetSpec  # fully resolved: no None left but `root` for embedded data
    class_names: list[str]
    splits: dict[str, Dataset]
    labels: dict[str, np.ndarray]
    source_index: dict[str, np.ndarray]  # position of each split row in the source data (split membership)
    in_channels: int
    image_size: int
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        return np.bincount(self.labels["train"], minlength=self.num_classes).tolist()

    def membership_sha256(self) -> dict[str, str]:
        """A digest of each split's source positions, so two caches can be checked to hold the same images."""
        return {s: hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
                for s, idx in self.source_index.items()}

    def describe(self) -> dict:
        return {
            **self.spec.to_dict(),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "train_class_counts": self.class_counts,
            "split_rows": {s: int(len(v)) for s, v in self.labels.items()},
            "split_membership_sha256": self.membership_sha256(),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            **self.extra,
        }


def small_image_transforms(mean: float, std: float, size: int, *, padding: int, flip: bool):
    """(train, test) transforms for small grayscale images: shift by up to `padding` px, optional flip."""
    import torch
    from torchvision.transforms import v2

    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean], [std])]
    augment = [v2.RandomCrop(size, padding=padding)] + ([v2.RandomHorizontalFlip()] if flip else [])
    return v2.Compose(augment + to_float), v2.Compose(to_float)


def _default(value, default):
    return default if value is None else value


DatasetBuilder = Callable[[DatasetSpec], LongTailData]


def register_dataset(name: str):
    """Register builder(spec) -> LongTailData as dataset `name`."""
    return DATASETS.register(name)


def build_dataset(spec: DatasetSpec, *, train_augment: bool = True) -> LongTailData:
    """Build a registered dataset. With train_augment=False the train split uses the test-time transform."""
    data = DATASETS[spec.name](spec)
    if not train_augment:
        data.splits["train"] = data.splits["train"].with_transform(data.splits["test"].transform)
    return data


def _from_arrays(spec, class_names, pools: dict[str, tuple[np.ndarray, np.ndarray]], splits, transforms, **extra):
    """Assemble LongTailData from source arrays: `splits` maps split name -> (pool name, positions in that pool)."""
    import torch

    from ltcache.data.images import ArrayImageDataset

    train_tf, test_tf = transforms
    datasets, labels, source = {}, {}, {}
    for split, (pool_name, positions) in splits.items():
        images, pool_labels = pools[pool_name]
        chosen = torch.from_numpy(images[positions])
        datasets[split] = ArrayImageDataset(
            chosen.unsqueeze(1) if chosen.ndim == 3 else chosen, pool_labels[positions],
            train_tf if split == "train" else test_tf,
        )
        labels[split] = pool_labels[positions].astype(np.int64)
        source[split] = positions.astype(np.int64)
    first = next(iter(pools.values()))[0]
    in_channels = 1 if first.ndim == 3 else first.shape[1]
    return LongTailData(spec, class_names, datasets, labels, source, in_channels=in_channels,
                        image_size=first.shape[-1], extra=extra)


@register_dataset("digits-lt")
def build_digits_lt(spec: DatasetSpec) -> LongTailData:
    """scikit-learn's bundled 8x8 digits: balanced test (40/class) and val (20/class), long-tailed train.

    The default profile (n_max 114, IF 50) gives 114, 73, 47, 30, 20, 12, 8, 5, 3, 2 train images, so the
    Many (>100), Medium (20-100) and Few (<20) groups are all non-empty.
    """
    from sklearn.datasets import load_digits

    spec = replace(spec, imbalance_factor=spec.imbalance_factor or 50.0, n_max=spec.n_max or 114,
                   val_per_class=_default(spec.val_per_class, 20), image_size=8, profile="exponential")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    profile = exponential_profile(10, spec.n_max, spec.imbalance_factor)
    positions = carve_splits(labels, train_counts=profile, val_per_class=spec.val_per_class, test_per_class=40,
                             seed=spec.seed)
    transforms = small_image_transforms(0.30, 0.38, 8, padding=1, flip=False)
    return _from_arrays(spec, [str(d) for d in range(10)], {"digits": (images, labels)},
                        {s: ("digits", p) for s, p in positions.items()}, transforms, test_per_class=40)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx(.gz) file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LtcacheError(f"{path} is not an idx file of unsigned bytes; point --root at the fashion-mnist files")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LtcacheError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(int(d) for d in dims))


def find_idx_files(root: Path) -> dict[str, Path]:
    """Locate the four idx files in `root`, `root/raw` or `root/FashionMNIST/raw`, gzipped or not."""
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in _IDX_FILES.items():
            for candidate in (folder / f"{stem}.gz", folder / stem):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_IDX_FILES):
            return found
    raise LtcacheError(
        f"fashion-mnist idx files not found under {root}; install Debian's dataset-fashion-mnist "
        f"(default root {FASHION_DEFAULT_ROOT}) or pass --root to a folder with train-images-idx3-ubyte.gz etc."
    )


@register_dataset("fashion-mnist-lt")
def build_fashion_mnist_lt(spec: DatasetSpec) -> LongTailData:
    """Fashion-MNIST made long-tailed like ImageNet-LT (1280 -> 5 images per class by default).

    Val (20/class) comes from train images the profile leaves unused; test is the official 10,000 images.
    """
    root = Path(spec.root or FASHION_DEFAULT_ROOT).expanduser()
    spec = replace(spec, root=str(root), imbalance_factor=spec.imbalance_factor or 256.0, n_max=spec.n_max or 1280,
                   val_per_class=_default(spec.val_per_class, 20), image_size=28, profile="exponential")
    files = find_idx_files(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    train_images, train_labels = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    test_images, test_labels = arrays["test_images"], arrays["test_labels"].astype(np.int64)
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise LtcacheError(f"fashion-mnist files under {root} disagree on the number of images and labels")
    profile = exponential_profile(10, spec.n_max, spec.imbalance_factor)
    positions = carve_splits(train_labels, train_counts=profile, val_per_class=spec.val_per_class, test_per_class=0,
                             seed=spec.seed)
    transforms = small_image_transforms(0.286, 0.353, 28, padding=2, flip=True)
    splits = {name: ("train", where) for name, where in positions.items()}
    splits["test"] = ("test", np.arange(len(test_labels)))
    return _from_arrays(spec, FASHION_CLASSES, {"train": (train_images, train_labels),
                                                 "test": (test_images, test_labels)},
                        splits, transforms)


@register_dataset("synthetic-lt")
def build_synthetic_lt(spec: DatasetSpec) -> LongTailData:
    """Seeded RGB noise with a per-class colour tint (so it is learnable), for throughput checks at any size.

    10 classes; default 224 px, n_max 200, imbalance factor 10; val 8 and test 16 per class.
    """
    import torch
    from torchvision.transforms import v2

    spec = replace(spec, imbalance_factor=spec.imbalance_factor or 10.0, n_max=spec.n_max or 200,
                   image_size=spec.image_size or 224, val_per_class=_default(spec.val_per_class, 8),
                   profile="exponential")
    profile = exponential_profile(10, spec.n_max, spec.imbalance_factor)
    per_class = [n + spec.val_per_class + 16 for n in profile]
    rng = np.random.default_rng(spec.seed)
    labels = np.repeat(np.arange(10), per_class)
    tints = rng.integers(40, 216, (10, 3, 1, 1))
    size = spec.image_size
    images = np.empty((len(labels), 3, size, size), dtype=np.uint8)
    for start in range(0, len(labels), 256):  # in blocks, to bound the float temporaries
        block = labels[start : start + 256]
        noise = rng.normal(0, 40, (len(block), 3, size, size))
        images[start : start + 256] = np.clip(tints[block] + noise, 0, 255).astype(np.uint8)
    positions = carve_splits(labels, train_counts=profile, val_per_class=spec.val_per_class, test_per_class=16,
                             seed=spec.seed)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)]
    transforms = v2.Compose([v2.RandomHorizontalFlip(), *to_float]), v2.Compose(to_float)
    return _from_arrays(spec, [f"class{c}" for c in range(10)], {"synthetic": (images, labels)},
                        {s: ("synthetic", p) for s, p in positions.items()}, transforms, test_per_class=16)
