"""Nearest class mean over L2-normalized features (Sec. 4), written as a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltcache.errors import unknown_name
from ltcache.stage2.core import Fitted, LabData, LinearHead, register

NCM_METRICS = ("cosine", "euclidean")


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


@register("ncm", summary="class means of L2-normalized train features; cosine (or euclidean) similarity",
          metric="cosine")
def fit_ncm(data: LabData, *, metric: str) -> Fitted:
    if metric not in NCM_METRICS:
        raise unknown_name("NCM metric", metric, NCM_METRICS)
    means = class_means(F.normalize(data.train.features, dim=1), data.train.labels, data.num_classes)
    if metric == "cosine":
        head = LinearHead(F.normalize(means, dim=1), None, normalize_input=True)
    else:
        # argmin ||f - m_j||^2 = argmax 2 f.m_j - ||m_j||^2 (||f||^2 = 1 is the same for every class)
        head = LinearHead(2 * means, -(means**2).sum(1), normalize_input=True)
    return Fitted(head, {"metric": metric})
