"""CIFAR-10-LT and CIFAR-100-LT from torchvision's python-pickle folders (the LDAM-DRW profile)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.data.datasets import DatasetSpec, _from_arrays, register_dataset
from ltcache.data.profiles import exponential_profile

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# name -> (folder, train files, test file, meta file, label key, names key, classes, n_max, torchvision class)
CIFAR = {
    "cifar10-lt": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                   b"labels", b"label_names", 10, 5000, "CIFAR10"),
    "cifar100-lt": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names", 100, 500,
                    "CIFAR100"),
}


def cifar_transforms():
    """(train, test): random 32x32 crop with 4 px padding and a horizontal flip; normalization only."""
    import torch
    from torchvision.transforms import v2

    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_float]), v2.Compose(to_float)


def _unpickle(path: Path) -> dict:
    # CIFAR's official release is a pickle; it is read here, never written (the cache holds no pickle).
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise LtcacheError(f"cannot read CIFAR file {path} ({type(exc).__name__}); re-download it") from None


def load_cifar(name: str, root: Path, *, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                     list[str]]:
    folder_name, train_files, test_file, meta_file, label_key, names_key, _, _, tv_class = CIFAR[name]
    folder = root if root.name == folder_name else root / folder_name
    if download and not folder.is_dir():
        import torchvision

        getattr(torchvision.datasets, tv_class)(str(root), download=True)  # a user-side download, never in tests
    if not folder.is_dir():
        raise LtcacheError(f"{folder} not found; pass --root to the folder holding {folder_name}/ "
                           "(torchvision's CIFAR layout) or add --download")

    def read(file: str):
        batch = _unpickle(folder / file)
        try:
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return images, np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise LtcacheError(f"{folder / file} is not a CIFAR batch ({type(exc).__name__}: {exc})") from None

    parts = [read(f) for f in train_files]
    train_images, train_labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_images, test_labels = read(test_file)
    names = [n.decode() for n in _unpickle(folder / meta_file)[names_key]]
    return train_images, train_labels, test_images, test_labels, names


def carve_cifar(labels: np.ndarray, profile: list[int], val_per_class: int, seed: int) -> tuple[dict, dict]:
    """Train follows the profile; val takes `val_per_class` unused images per class.

    At the literature's n_max the head class uses every image (5000 of 5000, 500 of 500), so its val images
    are taken from its own train images: the shortfall per class is returned and recorded in the manifest.
    """
    rng = np.random.default_rng(seed)
    train, val, borrowed = [], [], {}
    for c, n_train in enumerate(profile):
        pool = rng.permutation(np.flatnonzero(labels == c))
        if n_train > len(pool):
            raise LtcacheError(f"class {c} has {len(pool)} train images but the profile asks {n_train}; lower --n-max")
        shortfall = max(0, val_per_class - (len(pool) - n_train))
        if shortfall >= n_train:
            raise LtcacheError(f"--val-per-class {val_per_class} leaves class {c} with no training image; lower it")
        keep = n_train - shortfall
        train.append(pool[:keep])
        val.append(pool[keep : keep + val_per_class])
        if shortfall:
            borrowed[str(c)] = shortfall
    positions = {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}
    return {k: v for k, v in positions.items() if k == "train" or len(v)}, borrowed


def build_cifar_lt(spec: DatasetSpec):
    """CIFAR-10/100 from torchvision's python batches under --root, made long-tailed (exponential profile)."""
    num_classes, default_n_max = CIFAR[spec.name][6], CIFAR[spec.name][7]
    if not spec.root:
        raise LtcacheError(f"{spec.name} needs --root, the folder with torchvision's CIFAR files")
    root = Path(spec.root).expanduser()
    spec = replace(spec, root=str(root), imbalance_factor=spec.imbalance_factor or 100.0,
                   n_max=spec.n_max or default_n_max, image_size=32, profile="exponential",
                   val_per_class=20 if spec.val_per_class is None else spec.val_per_class)
    train_images, train_labels, test_images, test_labels, names = load_cifar(spec.name, root, download=spec.download)
    # The LDAM-DRW profile n_i = int(n_max * (1/IF)^(i/(C-1))): 12,406 (CIFAR-10-LT) and 10,847 (CIFAR-100-LT)
    # train images at IF 100, before any val image is taken.
    profile = exponential_profile(num_classes, spec.n_max, spec.imbalance_factor)
    positions, borrowed = carve_cifar(train_labels, profile, spec.val_per_class, spec.seed)
    splits = {name: ("train", where) for name, where in positions.items()}
    splits["test"] = ("test", np.arange(len(test_labels)))
    return _from_arrays(spec, names, {"train": (train_images, train_labels), "test": (test_images, test_labels)},
                        splits, cifar_transforms(), profile_train_images=sum(profile),
                        val_taken_from_train=borrowed)


for _name in CIFAR:
    register_dataset(_name)(build_cifar_lt)
