"""metrics.confusion against scikit-learn (the reference computation): per-class precision / recall / F1 / support,
the confusion matrix, and the most-confused pairs, also where a class is never predicted or has no test row; and
what an Evaluation row carries at few and at many classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from ltcache.metrics.confusion import MATRIX_CLASSES, confused_pairs, confusion_matrix, precision_recall_f1
from ltcache.metrics.evaluation import evaluate_logits


def _labels(seed: int, classes: int, rows: int = 600):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    predictions = np.where(rng.random(rows) < 0.6, labels, rng.integers(0, classes, rows))
    predictions[predictions == classes - 1] = 0  # the last class is never predicted
    labels[labels == 1] = 2  # class 1 has no test row (it is still predicted)
    return predictions, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_f1_equal_scikit_learn(seed):
    predictions, labels = _labels(seed, 7)
    ours = precision_recall_f1(predictions, labels, 7)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=range(7),
                                                                     zero_division=np.nan)
    np.testing.assert_allclose(ours["precision"], 100 * precision, equal_nan=True)
    np.testing.assert_allclose(ours["recall"], 100 * recall, equal_nan=True)
    np.testing.assert_allclose(ours["f1"], 100 * f1, equal_nan=True)
    np.testing.assert_array_equal(ours["support"], support)
    assert np.isnan(ours["precision"][6]) and ours["f1"][6] == 0  # never predicted, but present: F1 0
    assert np.isnan(ours["recall"][1]) and ours["f1"][1] == 0  # absent, but predicted: F1 0


def test_confusion_matrix_and_pairs_equal_the_brute_force():
    predictions, labels = _labels(3, 9)
    matrix = confusion_matrix(torch.as_tensor(predictions), torch.as_tensor(labels), 9)
    np.testing.assert_array_equal(matrix, sk_confusion_matrix(labels, predictions, labels=range(9)))
    off = [(int(matrix[i, j]), i, j) for i in range(9) for j in range(9) if i != j and matrix[i, j]]
    expected = sorted(off, key=lambda item: (-item[0], item[1] * 9 + item[2]))[:5]
    pairs = confused_pairs(predictions, labels, 9, top=5)
    assert [(p["count"], p["true"], p["predicted"]) for p in pairs] == expected
    for pair in pairs:
        assert pair["share"] == round(100 * pair["count"] / (labels == pair["true"]).sum(), 4)


def test_an_evaluation_row_has_the_matrix_at_few_classes_and_only_the_pairs_at_many():
    for classes in (5, MATRIX_CLASSES + 10):
        generator = torch.Generator().manual_seed(classes)
        labels = torch.arange(classes).repeat(6)
        logits = torch.randn(len(labels), classes, generator=generator) + 2 * torch.nn.functional.one_hot(
            labels, classes)
        row = evaluate_logits(logits, labels, [50] * classes, selection_logits=logits,
                              selection_labels=labels).as_row()
        assert len(row["per_class_precision"]) == len(row["per_class_f1"]) == classes
        assert row["per_class_support"] == [6] * classes
        assert row["macro_f1"] == pytest.approx(np.nanmean(row["per_class_f1"]), abs=1e-3)
        wrong = int((logits.argmax(1) != labels).sum())
        assert sum(p["count"] for p in row["confused_pairs"]) <= wrong and row["confused_pairs"]
        if classes <= MATRIX_CLASSES:
            matrix = np.asarray(row["confusion"])
            assert matrix.shape == (classes, classes) and matrix.sum() == len(labels)
            assert np.trace(matrix) == len(labels) - wrong
        else:
            assert "confusion" not in row  # 60 x 60 is not stored; the pairs are
