"""Long-tail profiles and the per-class carving of test / val / train from a labelled pool."""

from __future__ import annotations

import math

import numpy as np

from ltcache.core.errors import LtcacheError


def exponential_profile(num_classes: int, n_max: int, imbalance_factor: float) -> list[int]:
    """Train images per class: n_i = floor(n_max * IF^(-i/(C-1))), class 0 the most frequent."""
    if num_classes < 2:
        raise LtcacheError(f"a long-tail profile needs at least 2 classes, got {num_classes}")
    if imbalance_factor < 1:
        raise LtcacheError(f"--imbalance-factor must be >= 1, got {imbalance_factor}")
    if n_max < 1:
        raise LtcacheError(f"--n-max must be >= 1, got {n_max}")
    # The tiny epsilon keeps exact powers (1280 / 256 = 5) from flooring to 4 through rounding noise.
    counts = [math.floor(n_max * imbalance_factor ** (-i / (num_classes - 1)) + 1e-9) for i in range(num_classes)]
    return [max(1, c) for c in counts]


def step_profile(num_classes: int, n_max: int, imbalance_factor: float, *, minority_fraction: float = 0.5) -> list[int]:
    """Step imbalance (Buda et al. 2018; Cao et al. 2019): the last `minority_fraction` of classes get n_max / IF."""
    n_minority = round(num_classes * minority_fraction)
    n_min = max(1, math.floor(n_max / imbalance_factor + 1e-9))
    return [n_max] * (num_classes - n_minority) + [n_min] * n_minority


PROFILES = {"exponential": exponential_profile, "step": step_profile}


def carve_splits(
    labels: np.ndarray,
    *,
    train_counts: list[int],
    val_per_class: int,
    test_per_class: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Pick, per class, `test_per_class` then `val_per_class` then `train_counts[c]` distinct pool positions.

    Returns sorted positions into `labels` for each split (val or test is omitted when it would be empty).
    Val and test are balanced and disjoint from train; train follows the profile.
    """
    rng = np.random.default_rng(seed)
    picked: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, n_train in enumerate(train_counts):
        pool = np.flatnonzero(labels == c)
        need = test_per_class + val_per_class + n_train
        if need > len(pool):
            raise LtcacheError(
                f"class {c} has {len(pool)} images but the profile needs {need} "
                f"({n_train} train + {val_per_class} val + {test_per_class} test); lower --n-max"
            )
        pool = rng.permutation(pool)
        picked["test"].append(pool[:test_per_class])
        picked["val"].append(pool[test_per_class : test_per_class + val_per_class])
        picked["train"].append(pool[test_per_class + val_per_class : need])
    splits = {name: np.sort(np.concatenate(parts)) for name, parts in picked.items()}
    return {name: positions for name, positions in splits.items() if name == "train" or len(positions)}
