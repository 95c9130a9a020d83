"""Sampling by class (Sec. 3): Eq. 1, p_j = n_j^q / sum_i n_i^q, shared by stage 1's sampler and stage 2's re-trained
heads, and the registry of stage 1's strategies (instance-, class-, square-root- and progressively-balanced, Eq.
1-2, and the official class-aware sampler), each fn(class_counts, epoch, total_epochs) -> that epoch's class
probabilities (None: the class-aware order). No torch here."""

from __future__ import annotations

import numpy as np

from ltcache.core.registry import Registry

SAMPLERS: Registry = Registry("sampler")


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


def parse_sampler(name: str) -> str:
    """A registered sampler's name (an unknown one is a one-line error listing them)."""
    SAMPLERS.get(str(name))
    return str(name)


@SAMPLERS.register("instance")
def instance_balanced(class_counts, epoch: int, total_epochs: int) -> np.ndarray:
    """Eq. 1 with q = 1: every image equally likely."""
    return class_probabilities(class_counts, 1.0)


@SAMPLERS.register("class")
def class_balanced(class_counts, epoch: int, total_epochs: int) -> np.ndarray:
    """Eq. 1 with q = 0: every class equally likely."""
    return class_probabilities(class_counts, 0.0)


@SAMPLERS.register("sqrt")
def square_root(class_counts, epoch: int, total_epochs: int) -> np.ndarray:
    """Eq. 1 with q = 1/2."""
    return class_probabilities(class_counts, 0.5)


@SAMPLERS.register("class-aware")
def class_aware(class_counts, epoch: int, total_epochs: int) -> None:
    """The official class-aware sampler: no probabilities, an order (class_aware_order)."""
    return None


@SAMPLERS.register("progressive")
def progressive_probabilities(class_counts, epoch: int, total_epochs: int) -> np.ndarray:
    """Eq. 2: p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB, with t the 0-based epoch and T the number of epochs."""
    ratio = epoch / total_epochs
    return (1 - ratio) * class_probabilities(class_counts, 1.0) + ratio * class_probabilities(class_counts, 0.0)


def epoch_class_probabilities(name: str, class_counts, epoch: int, total_epochs: int) -> np.ndarray | None:
    """The class probabilities of sampler `name` in this epoch."""
    return SAMPLERS[str(getattr(name, "value", name))](class_counts, epoch, total_epochs)
