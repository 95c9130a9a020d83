"""Eq. 1 of the paper, shared by stage 1's samplers and stage 2's re-trained heads: p_j = n_j^q / sum_i n_i^q."""

from __future__ import annotations

import numpy as np


def class_probabilities(class_counts, q: float) -> np.ndarray:
    """Eq. 1: p_j = n_j^q / sum_i n_i^q (q = 1 instance-balanced, 0 class-balanced, 1/2 square-root)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    powered = counts**q
    return powered / powered.sum()


def sample_weights(labels: np.ndarray, class_probs: np.ndarray) -> np.ndarray:
    """Per-sample weight p_{y} / n_{y}, so that class y is drawn with probability p_y."""
    counts = np.bincount(labels, minlength=len(class_probs)).astype(np.float64)
    per_class = np.divide(class_probs, counts, out=np.zeros_like(class_probs), where=counts > 0)
    return per_class[labels]
