"""Nearest class mean over L2-normalized features (Sec. 4), written as a linear head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.core.params import Param
from ltcache.heads import LOGIT_CHUNK_ROWS, LinearHead
from ltcache.logits import as_float32
from ltcache.stage2.cards import CLASSIFIER_BALANCING, DECOUPLING, KANG_2020, Card, Deviation
from ltcache.stage2.core import Fitted, LabData, method

if TYPE_CHECKING:
    import torch

NCM_METRICS = ("cosine", "euclidean")
NCM_FEATURES = ("un", "l2n", "cl2n")  # the official code's modes: raw, L2-normalized, centered then normalized


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, transform=None) -> torch.Tensor:
    """Mean of transform(f) per class, a chunk of rows at a time: no transformed copy of the whole split."""
    import torch

    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32, device=features.device)
    for chunk, chunk_labels in zip(features.split(LOGIT_CHUNK_ROWS), labels.split(LOGIT_CHUNK_ROWS), strict=True):
        chunk = as_float32(chunk)  # a float16 cache's rows, upcast a chunk at a time
        sums.index_add_(0, chunk_labels, chunk if transform is None else transform(chunk))
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(torch.float32)
    return sums / counts[:, None]


NCM_CARD = Card(
    paper=KANG_2020, title=DECOUPLING,
    code=f"{CLASSIFIER_BALANCING}: models/KNNClassifier.py, run_networks.py (get_knncentroids), main.py (--knn: "
         "feat_type cl2n, dist_type l2)",
    matches=("The official defaults: features centred on the train mean and L2-normalized (cl2n), class means of "
             "those features, nearest mean by Euclidean distance (metric=euclidean, features=cl2n).",
             "The feature modes un / l2n / cl2n and the class means as get_knncentroids computes them (means of the "
             "transformed train features, not normalized again)."),
    deviations=(Deviation("metric=cosine normalizes the class means too: true cosine similarity.",
                          "KNNClassifier's 'cos' divides x . c by d without normalizing c, which ranks classes by "
                          "||c|| cos(x, c); Sec. 4 of the paper describes cosine similarity."),),
    reference_test="tests/test_reference.py::test_ncm_equals_the_official_knn_classifier")


@method("ncm", Param("metric", str, "euclidean", "Distance to the class means (the official default: euclidean).",
                     choices=NCM_METRICS),
        Param("features", str, "cl2n", "Feature mode: raw, L2-normalized, centred then normalized (the official "
              "default: cl2n).", choices=NCM_FEATURES),
        summary="nearest class mean: un / l2n / cl2n train features, euclidean or cosine (Sec. 4); the official "
        "default cl2n + euclidean", paper=2, card=NCM_CARD)
def fit_ncm(data: LabData, *, metric: str, features: str) -> Fitted:
    import torch
    import torch.nn.functional as F

    center = data.train.features.mean(0, dtype=torch.float32) if features == "cl2n" else None
    normalize = features != "un"

    def transform(chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk - center if center is not None else chunk
        return F.normalize(chunk, dim=1) if normalize else chunk

    means = class_means(data.train.features, data.train.labels, data.num_classes, transform)
    if metric == "cosine":  # cosine similarity normalizes the query itself, whatever the feature mode
        head = LinearHead(F.normalize(means, dim=1), None, normalize_input=True, center=center)
    else:
        # argmin ||f - m_j||^2 = argmax 2 f.m_j - ||m_j||^2, since ||f||^2 is the same for every class
        head = LinearHead(2 * means, -(means**2).sum(1), normalize_input=normalize, center=center)
    return Fitted(head, {"metric": metric, "features": features})
