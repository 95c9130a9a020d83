"""The epoch sampler of stage 1: draws each epoch's order by a registered strategy (sampling.py: instance-, class-,
square-root- and progressively-balanced, Eq. 1-2, and the official class-aware sampler)."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import numpy as np
import torch
from torch.utils.data import Sampler

from ltcache.core.sampling import (  # noqa: F401  (the strategies and Eq. 1 live in the torch-free sampling.py)
    SAMPLERS,
    class_probabilities,
    epoch_class_probabilities,
    parse_sampler,
    progressive_probabilities,
    sample_weights,
)


class SamplerName(str, Enum):
    """The built-in samplers' names (SAMPLERS has every registered one)."""

    instance = "instance"
    klass = "class"
    sqrt = "sqrt"
    progressive = "progressive"
    class_aware = "class-aware"


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
