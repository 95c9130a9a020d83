"""Top-1, mean per-class accuracy, and Many / Medium / Few shot groups (Sec. 5.1), all in percent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUPS = ("many", "medium", "few")


@dataclass(frozen=True)
class ShotThresholds:
    """Many: more than `many` train images; Few: fewer than `few`; Medium: the rest (20-100 inclusive)."""

    many: int = 100
    few: int = 20


def shot_groups(class_counts, thresholds: ShotThresholds = ShotThresholds()) -> np.ndarray:
    """The group name of every class, from its train image count."""
    counts = np.asarray(class_counts)
    groups = np.full(len(counts), "medium", dtype=object)
    groups[counts > thresholds.many] = "many"
    groups[counts < thresholds.few] = "few"
    return groups


def per_class_accuracy(predictions, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class in percent; NaN for a class with no samples."""
    predictions = torch.as_tensor(predictions).cpu().numpy()
    labels = torch.as_tensor(labels).cpu().numpy()
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * correct / totals, np.nan)


def summarize(class_accuracy: np.ndarray, overall: float, class_counts, thresholds: ShotThresholds) -> dict:
    groups = shot_groups(class_counts, thresholds)
    result = {"all": float(overall), "mean_per_class": float(np.nanmean(class_accuracy))}
    for group in GROUPS:
        members = class_accuracy[groups == group]
        members = members[~np.isnan(members)]
        result[group] = float(members.mean()) if len(members) else float("nan")
        result[f"n_{group}"] = int((groups == group).sum())
    return result


def evaluate(predictions, labels, class_counts, thresholds: ShotThresholds = ShotThresholds()) -> dict:
    """All (top-1 over samples), mean per-class accuracy, and Many / Medium / Few (mean per-class within group)."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    overall = 100.0 * (predictions == labels).double().mean().item() if len(labels) else float("nan")
    return summarize(per_class_accuracy(predictions, labels, len(class_counts)), overall, class_counts, thresholds)
