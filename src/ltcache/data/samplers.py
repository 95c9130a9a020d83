"""Sampling strategies of Sec. 3: instance-, class-, square-root- and progressively-balanced (Eq. 1-2), and the
official class-aware sampler. Each is registered in SAMPLERS as fn(class_counts, epoch, total_epochs) -> the class
probabilities of that epoch (None: the class-aware order)."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import numpy as np
import torch
from torch.utils.data import Sampler

from ltcache.registry import Registry
from ltcache.sampling import class_probabilities, sample_weights  # noqa: F401  (Eq. 1, shared with stage 2)

SAMPLERS: Registry = Registry("sampler")


class SamplerName(str, Enum):
    """The built-in samplers' names (SAMPLERS has every registered one)."""

    instance = "instance"
    klass = "class"
    sqrt = "sqrt"
    progressive = "progressive"
    class_aware = "class-aware"


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
    return SAMPLERS[str(name.value if isinstance(name, SamplerName) else name)](class_counts, epoch, total_epochs)


def class_aware_order(labels: np.ndarray, n: int, samples_per_class: int, generator: torch.Generator) -> torch.Tensor:
    """The official code's class-aware sampler: cycle over the classes in shuffled order (reshuffled after each
    pass) and take `samples_per_class` consecutive images from each class's own shuffled cycle.

    An epoch is n draws, as for every other strategy. So it is in the official code too: its sampler reports a
    length of max_j n_j x C, but its training loop runs int(N / B) steps per epoch, about N draws.
    """
    members = [torch.as_tensor(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
    classes = [c for c, m in enumerate(members) if len(m)]
    cycles = {c: members[c][torch.randperm(len(members[c]), generator=generator)] for c in classes}
    positions = dict.fromkeys(classes, 0)
    order: list[torch.Tensor] = []
    drawn = 0
    while drawn < n:
        for c in (classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()):
            take = []
            for _ in range(samples_per_class):
                if positions[c] == len(cycles[c]):  # this class's cycle is spent: reshuffle it
                    cycles[c] = members[c][torch.randperm(len(members[c]), generator=generator)]
                    positions[c] = 0
                take.append(cycles[c][positions[c]])
                positions[c] += 1
            order.append(torch.stack(take))
            drawn += samples_per_class
            if drawn >= n:
                break
    return torch.cat(order)[:n]


class EpochSampler(Sampler[int]):
    """Draws one epoch of `len(labels)` indices (split across ranks) with the strategy's class probabilities.

    Instance-balanced sampling is a plain shuffle (each image once per epoch); the other strategies draw with
    replacement from the per-sample weights. The draw depends only on (seed, epoch), so every rank sees the same
    permutation and takes its own stride of it; the draw wraps around so that every rank gets the same number
    of samples (unequal lengths would hang DDP on the last step).
    """

    def __init__(self, labels, name: str, *, total_epochs: int, seed: int = 0, rank: int = 0, world: int = 1,
                 samples_per_class: int = 4):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = parse_sampler(name.value if isinstance(name, SamplerName) else name)
        self.total_epochs = total_epochs
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.class_counts = np.bincount(self.labels)
        self.samples_per_class = samples_per_class

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.world)

    def draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        if self.name == "instance":  # a permutation: each image once per epoch, not drawn with replacement
            return torch.randperm(n, generator=generator)
        probs = epoch_class_probabilities(self.name, self.class_counts, self.epoch, self.total_epochs)
        if probs is None:
            return class_aware_order(self.labels, n, self.samples_per_class, generator)
        weights = torch.as_tensor(sample_weights(self.labels, probs))
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        drawn = self.draw()
        padded = torch.cat([drawn, drawn[: len(self) * self.world - len(drawn)]])
        return iter(padded[self.rank :: self.world].tolist())
