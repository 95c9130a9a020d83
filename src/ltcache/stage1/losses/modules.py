"""The torch modules of stage 1's losses (registered by name in losses.py, which builds them)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_balanced_weights(class_counts, beta: float) -> torch.Tensor:
    """Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples": w_c ∝ (1-β) / (1-β^n_c),
    normalized to sum to the number of classes."""
    counts = np.asarray(class_counts, dtype=np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return torch.tensor(weights / weights.sum() * len(counts), dtype=torch.float32)


class WeightedLoss(nn.Module):
    """Base: optional per-class weights, fixed (`beta`) or deferred until `drw_epoch` (DRW)."""

    def __init__(self, class_counts, *, beta: float | None = None, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        super().__init__()
        self.class_counts = list(class_counts)
        self.drw_epoch = drw_epoch
        fixed = class_balanced_weights(class_counts, beta) if beta is not None else None
        self.deferred = class_balanced_weights(class_counts, drw_beta) if drw_epoch is not None else None
        self.register_buffer("weight", fixed if fixed is not None else torch.ones(len(self.class_counts)))
        self.uniform = fixed is None

    def set_epoch(self, epoch: int) -> None:
        if self.deferred is not None:
            self.weight.copy_(self.deferred if epoch >= self.drw_epoch else torch.ones_like(self.deferred))
            self.uniform = epoch < self.drw_epoch

    def class_weight(self) -> torch.Tensor | None:
        return None if self.uniform else self.weight


class CrossEntropy(WeightedLoss):
    """Softmax cross-entropy; with `beta`, the class-balanced CE of Cui et al. 2019."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=self.class_weight())


class Focal(WeightedLoss):
    """Lin et al. 2017, "Focal Loss for Dense Object Detection": -(1 - p_t)^γ log p_t (softmax form); with `beta`,
    each sample is weighted by its class's class-balanced weight (CB focal, Cui et al. 2019)."""

    def __init__(self, class_counts, *, gamma: float = 1.0, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        weight = self.class_weight()
        if weight is not None:
            w = weight[targets]
            return (w * loss).sum() / w.sum()
        return loss.mean()


class LDAM(WeightedLoss):
    """Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss":
    CE(s * (z - Δ_y e_y)) with Δ_j ∝ n_j^(-1/4), the largest margin `max_margin`.

    The LDAM code uses s = 30 on a normalized (cosine) classifier; ltcache's stage-1 head is linear, so s
    defaults to 1 (margins in logit units). Use with drw_epoch for LDAM-DRW."""

    def __init__(self, class_counts, *, max_margin: float = 0.5, s: float = 1.0, **kwargs):
        super().__init__(class_counts, **kwargs)
        margins = 1.0 / np.power(np.asarray(class_counts, dtype=np.float64), 0.25)
        self.register_buffer("margins", torch.tensor(margins * (max_margin / margins.max()), dtype=torch.float32))
        self.s = s

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shifted = logits.float() - F.one_hot(targets, logits.shape[1]) * self.margins[targets][:, None]
        return F.cross_entropy(self.s * shifted, targets, weight=self.class_weight())


class LogitAdjusted(nn.Module):
    """Menon et al. 2021, "Long-tail learning via logit adjustment": CE(z + τ log π), π the train class prior.
    With τ = 1 this is Balanced Softmax (Ren et al. 2020, "Balanced Meta-Softmax")."""

    def __init__(self, class_counts, *, tau: float = 1.0):
        super().__init__()
        counts = torch.tensor(class_counts, dtype=torch.float32)
        self.register_buffer("adjustment", tau * torch.log(counts / counts.sum()))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, targets)
