"""Class priors: forward / backward long-tailed test priors, accuracy under a prior, and target-prior specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import read_text

SHIFT_FACTORS = (2, 5, 10, 25, 50)


def long_tailed_prior(class_counts, factor: float, direction: str) -> np.ndarray:
    """A test prior pi_c ∝ factor^(-rank_c / (C - 1)), summing to 1. "forward" keeps the train order (frequent train
    classes stay frequent), "backward" reverses it; factor 1 is uniform."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    rank = np.empty(len(order), dtype=np.float64)
    rank[order] = np.arange(len(order))
    if direction == "backward":
        rank = rank.max() - rank
    elif direction != "forward":
        raise LtcacheError(f"a shifted prior's direction is forward or backward, got {direction!r}")
    prior = float(factor) ** (-rank / max(rank.max(), 1))
    return prior / prior.sum()


def shifted_priors(class_counts, imbalance_factors=SHIFT_FACTORS) -> dict[str, np.ndarray]:
    """forward_F and backward_F long-tailed test priors for every imbalance factor F."""
    return {f"{direction}_{factor}": long_tailed_prior(class_counts, factor, direction)
            for factor in imbalance_factors for direction in ("forward", "backward")}


def prior_accuracy(class_accuracy: np.ndarray, prior: np.ndarray) -> float:
    """sum_c pi_c * acc_c: the accuracy on a test set whose classes follow `prior`. Exact for a balanced test set
    reweighted per class."""
    return float((np.asarray(prior) * np.nan_to_num(class_accuracy, nan=0.0)).sum())


def shifted_prior_accuracy(class_accuracy: np.ndarray, class_counts, imbalance_factors=SHIFT_FACTORS) -> dict:
    """Accuracy if test followed a forward or backward long-tailed prior instead of a balanced one."""
    return {name: prior_accuracy(class_accuracy, prior)
            for name, prior in shifted_priors(class_counts, imbalance_factors).items()}


def parse_prior(spec, class_counts) -> np.ndarray:
    """A target class prior from its spec: uniform, train, forward:F, backward:F, a path to a .npy / .json / .txt
    file of one non-negative weight per class, or an array. Returned normalized to sum 1."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if not isinstance(spec, str):
        prior = np.asarray(spec, dtype=np.float64)
    elif spec == "uniform":
        prior = np.ones(len(counts))
    elif spec == "train":
        prior = counts.copy()
    elif spec.split(":")[0] in ("forward", "backward") and spec.count(":") == 1:
        direction, factor = spec.split(":")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not value >= 1:
            raise LtcacheError(f"target prior {spec!r}: the imbalance factor must be a number >= 1, e.g. "
                               f"{direction}:10")
        return long_tailed_prior(counts, value, direction)
    else:
        prior = _read_prior_file(spec)
    if prior.shape != counts.shape or not np.all(np.isfinite(prior)) or (prior < 0).any() or prior.sum() <= 0:
        raise LtcacheError(f"target prior {spec if isinstance(spec, str) else 'array'} must hold {len(counts)} "
                           "finite non-negative weights, one per class, not all zero")
    return prior / prior.sum()


def _read_prior_file(spec: str) -> np.ndarray:
    path = Path(spec)
    if not path.is_file():
        raise LtcacheError(f"target prior {spec!r} is neither uniform, train, forward:F, backward:F nor an existing "
                           ".npy / .json / .txt file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float64).ravel()
        if path.suffix == ".json":
            return np.asarray(json.loads(read_text(path, "target prior file")), dtype=np.float64).ravel()
        return np.loadtxt(path, dtype=np.float64, ndmin=1).ravel()
    except (ValueError, TypeError, OSError) as exc:
        raise LtcacheError(f"target prior file {path} is unreadable ({exc}); write one number per class") from None




TEST_PRIOR_MODES = ("reweight", "subsample")


def subsample_to_prior(labels: np.ndarray, prior: np.ndarray, seed: int) -> np.ndarray:
    """Rows of a test set drawn to follow `prior`, as SADE's forward / backward long-tailed test sets are built from
    a balanced one (Zhang et al., NeurIPS 2022): class c keeps round(m pi_c / max pi) of its rows, m the smallest
    class's rows, at least one where pi_c > 0, drawn without replacement with `seed`. Sorted row indices."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(prior))
    present = counts > 0
    if not present.any():
        return np.empty(0, dtype=np.int64)
    smallest = int(counts[present].min())
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.flatnonzero(present & (np.asarray(prior) > 0)):
        rows = np.flatnonzero(labels == label)
        take = min(len(rows), max(1, round(smallest * float(prior[label]) / float(np.max(prior)))))
        keep.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.empty(0, dtype=np.int64)


def accuracy_under_prior(predictions, labels, class_counts, prior: np.ndarray, *, mode: str, seed: int = 0,
                        thresholds=None) -> dict:
    """Test accuracy if test followed `prior` (compare --test-prior). reweight: All = sum_c pi_c acc_c (exact for a
    balanced test set), and each shot group the prior-weighted mean of its classes. subsample: every metric on a
    seeded subset drawn to the prior (subsample_to_prior). Returns the accuracy dict with 'rows' (the test rows it
    counts: all of them when reweighting)."""
    from ltcache.metrics.accuracy import GROUPS, ShotThresholds, evaluate, per_class_accuracy, shot_groups, to_numpy

    thresholds = thresholds or ShotThresholds()
    predictions, labels = to_numpy(predictions), to_numpy(labels)
    if mode == "subsample":
        rows = subsample_to_prior(labels, prior, seed)
        return {**evaluate(predictions[rows], labels[rows], class_counts, thresholds), "rows": int(len(rows))}
    if mode != "reweight":
        raise LtcacheError(f"--test-prior-mode {mode!r} is not one of {', '.join(TEST_PRIOR_MODES)}")
    accuracy = per_class_accuracy(predictions, labels, len(class_counts))
    result = evaluate(predictions, labels, class_counts, thresholds)
    seen = ~np.isnan(accuracy)
    weights = np.where(seen, prior, 0.0)
    result["all"] = float((weights * np.nan_to_num(accuracy)).sum() / weights.sum()) if weights.sum() > 0 \
        else float("nan")
    groups = shot_groups(class_counts, thresholds)
    for group in GROUPS:
        member = weights * (groups == group)
        result[group] = float((member * np.nan_to_num(accuracy)).sum() / member.sum()) if member.sum() > 0 \
            else float("nan")
    return {**result, "rows": int(len(labels))}
