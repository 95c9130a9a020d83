"""Which classes a head confuses, at any number of classes: scikit-learn-style per-class precision / recall / F1
(`precision_recall_f1`, the same numbers as `sklearn.metrics.precision_recall_fscore_support(zero_division=nan)`),
the full confusion matrix where it is small enough to draw, and the most-confused (true, predicted) pairs from the
misclassified rows alone, so that iNaturalist's 8,142 classes never need a 66-million-cell matrix."""

from __future__ import annotations

import numpy as np

from ltcache.metrics.accuracy import per_class_accuracy, to_numpy

MATRIX_CLASSES = 50  # the full confusion matrix is stored (and drawn as a heatmap) up to this many classes
CONFUSED_PAIRS = 20  # the most-confused pairs stored per method


def precision_recall_f1(predictions, labels, num_classes: int) -> dict[str, np.ndarray]:
    """Per class, in percent: precision (of the rows predicted as the class, the share that is it), recall (its
    accuracy), F1 = 2TP / (2TP + FP + FN) (their harmonic mean where both exist), and support (its test rows). NaN
    where undefined: precision of a class never predicted, recall of a class without test rows, F1 of a class
    neither present nor predicted. As scikit-learn's precision_recall_fscore_support(zero_division=nan)."""
    predictions, labels = to_numpy(predictions).astype(np.int64), to_numpy(labels).astype(np.int64)
    true_positive = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    predicted = np.bincount(predictions, minlength=num_classes).astype(np.float64)
    support = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, 100.0 * true_positive / predicted, np.nan)
        f1 = np.where(predicted + support > 0, 200.0 * true_positive / (predicted + support), np.nan)
    recall = per_class_accuracy(predictions, labels, num_classes)  # recall is the class's accuracy
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
    """counts[i, j]: test rows of class i predicted as j (rows: true class, as scikit-learn's confusion_matrix)."""
    predictions, labels = to_numpy(predictions).astype(np.int64), to_numpy(labels).astype(np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confused_pairs(predictions, labels, num_classes: int, top: int = CONFUSED_PAIRS) -> list[dict]:
    """The `top` (true, predicted) pairs with the most misclassified test rows, most first (ties: by class index),
    each with its count and its share of the true class's test rows (percent). Memory: the misclassified rows only."""
    predictions, labels = to_numpy(predictions).astype(np.int64), to_numpy(labels).astype(np.int64)
    wrong = predictions != labels
    keys, counts = np.unique(labels[wrong] * num_classes + predictions[wrong], return_counts=True)
    order = np.lexsort((keys, -counts))[:top]
    support = np.bincount(labels, minlength=num_classes)
    pairs = []
    for index in order:
        true, predicted = divmod(int(keys[index]), num_classes)
        pairs.append({"true": true, "predicted": predicted, "count": int(counts[index]),
                      "share": round(100.0 * int(counts[index]) / int(support[true]), 4)})
    return pairs
