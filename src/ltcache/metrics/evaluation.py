"""The one evaluator: a head's logits on test become an `Evaluation`, a typed result with accuracy and groups,
calibration raw and after temperature scaling, bootstrap intervals and accuracy under shifted priors. Reports and
the command line read its fields; `as_row()` is its flat form in results.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from ltcache.logits import chunk_rows, exp_shifted_, labelled_blocks
from ltcache.metrics.accuracy import GroupAccuracy, ShotThresholds, bootstrap_intervals, per_class_accuracy, summarize
from ltcache.metrics.calibration import Calibration, calibration_from, fit_temperature
from ltcache.metrics.confusion import MATRIX_CLASSES, confused_pairs, confusion_matrix, precision_recall_f1
from ltcache.metrics.priors import shifted_prior_accuracy

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Evaluation:
    """What test says of one head. `temperature` is fitted on the selection split (never on test), and
    `calibrated` is the calibration after dividing the logits by it. `intervals` holds 95% percentile bootstrap
    intervals of each accuracy key (None without bootstrap)."""

    accuracy: GroupAccuracy
    calibration: Calibration
    temperature: float
    calibrated: Calibration
    shifted_priors: dict[str, float]
    intervals: dict[str, tuple[float, float]] | None = None
    per_class: tuple[float, ...] | None = None  # test accuracy of each class in percent (NaN: no test sample)
    # scikit-learn's per-class report: precision and F1 in percent (recall is per_class), test rows per class
    precision: tuple[float, ...] | None = None
    f1: tuple[float, ...] | None = None
    support: tuple[int, ...] | None = None
    confused: tuple[dict, ...] | None = None  # the most-confused (true, predicted) pairs, most first
    confusion: tuple[tuple[int, ...], ...] | None = None  # counts[true][predicted], up to MATRIX_CLASSES classes

    # The accuracy keys, read directly: evaluation.all, evaluation.few, ...
    @property
    def all(self) -> float:
        return self.accuracy.all

    @property
    def mean_per_class(self) -> float:
        return self.accuracy.mean_per_class

    @property
    def many(self) -> float:
        return self.accuracy.many

    @property
    def medium(self) -> float:
        return self.accuracy.medium

    @property
    def few(self) -> float:
        return self.accuracy.few

    def as_row(self) -> dict:
        """The flat keys of a results.json row (the schema of ltcache 0.1)."""
        raw = asdict(self.calibration)
        scaled = {f"{key}_ts": value for key, value in asdict(self.calibrated).items() if key != "reliability"}
        row = {**self.accuracy.as_dict(), **raw, "shifted_priors": dict(self.shifted_priors),
               "temperature": self.temperature, **scaled}
        if self.intervals is not None:
            row["ci95"] = {key: list(bounds) for key, bounds in self.intervals.items()}
        if self.per_class is not None:
            row["per_class"] = _rounded(self.per_class)
        if self.precision is not None:
            row.update({"per_class_precision": _rounded(self.precision), "per_class_f1": _rounded(self.f1),
                        "per_class_support": list(self.support), "macro_precision": _nanmean(self.precision),
                        "macro_f1": _nanmean(self.f1), "confused_pairs": [dict(p) for p in self.confused]})
        if self.confusion is not None:
            row["confusion"] = [list(line) for line in self.confusion]
        return row


def _rounded(values) -> list:
    return [None if v != v else round(v, 4) for v in values]  # JSON has no NaN


def _nanmean(values) -> float | None:
    present = [v for v in values if v == v]
    return round(sum(present) / len(present), 4) if present else None


def top_k_accuracy(logits, labels: torch.Tensor, k: int, chunk_rows: int = 16384) -> float:
    """Percent of rows whose label is among the k largest logits (all of them when there are at most k classes).
    `logits` is a tensor or a BlockLogits (read block by block)."""
    if len(labels) == 0:
        return float("nan")
    hits = sum(int(top_k_hits(chunk, chunk_labels, k).sum())
               for chunk, chunk_labels in labelled_blocks(logits, labels, chunk_rows))
    return 100.0 * hits / len(labels)


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, whether its label is among the k largest logits (every class when there are at most k)."""
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(1)


@dataclass(frozen=True)
class RowStatistics:
    """What scoring needs of each test row, taken in one pass over its logits: the prediction, whether the label
    is among the top 5, and the confidence (largest softmax probability) raw and at the fitted temperature. Under
    torchrun each rank computes its share of the rows and they are gathered; the metrics come from these alone."""

    predictions: torch.Tensor
    top5: torch.Tensor
    confidence: torch.Tensor
    scaled_confidence: torch.Tensor

    def gathered(self, rows: int) -> RowStatistics:
        """Every rank's rows, in order (distributed.gather_rows); itself in a single process."""
        from ltcache.core.distributed import gather_rows

        return RowStatistics(*(gather_rows(getattr(self, f.name), rows) for f in fields(self)))


def row_statistics(logits, labels: torch.Tensor, temperature: float, rows: int | None = None) -> RowStatistics:
    """One pass over `logits` (a tensor or a BlockLogits), a chunk of rows at a time: no probability matrix."""
    import torch

    parts: list[tuple] = []
    rows = rows or chunk_rows(logits.shape[1])
    for chunk, chunk_labels in labelled_blocks(logits, labels, rows):
        peak, index = chunk.max(1)
        shifted = chunk - peak[:, None]
        top = top_k_hits(chunk, chunk_labels, 5)
        raw = 1.0 / exp_shifted_(shifted.clone()).sum(1)
        scaled = 1.0 / exp_shifted_(shifted.div_(temperature)).sum(1)
        parts.append((index, top, raw, scaled))
    if not parts:  # no rows (under torchrun, a rank whose share is empty): on the rows' device, for the gather
        device = labels.device
        empty = torch.empty(0, device=device)
        return RowStatistics(torch.empty(0, dtype=torch.int64, device=device),
                             torch.empty(0, dtype=torch.bool, device=device), empty, empty)
    return RowStatistics(*(torch.cat(column) for column in zip(*parts, strict=True)))


def evaluate_logits(logits, labels: torch.Tensor, class_counts, *, selection_logits,
                    selection_labels: torch.Tensor, thresholds: ShotThresholds = ShotThresholds(),
                    bootstrap: int = 0, seed: int = 0) -> Evaluation:
    """Everything test says of one head, from its test logits. The temperature is fitted on the selection split's
    logits; with bootstrap > 0, that many test resamples give the 95% intervals. Either logits may be a tensor or a
    BlockLogits (beyond the memory budget: computed block by block on every pass, never held whole)."""
    temperature = fit_temperature(selection_logits, selection_labels)
    return evaluate_rows(row_statistics(logits, labels, temperature), labels, class_counts, temperature=temperature,
                         thresholds=thresholds, bootstrap=bootstrap, seed=seed)


def evaluate_rows(rows: RowStatistics, labels: torch.Tensor, class_counts, *, temperature: float,
                  thresholds: ShotThresholds = ShotThresholds(), bootstrap: int = 0, seed: int = 0) -> Evaluation:
    """The Evaluation from every test row's statistics (row_statistics) and the temperature fitted on the
    selection split."""
    predictions = rows.predictions
    class_accuracy = per_class_accuracy(predictions, labels, len(class_counts))
    overall = 100.0 * (predictions == labels).double().mean().item() if len(labels) else float("nan")
    top5 = 100.0 * rows.top5.double().mean().item() if len(labels) else float("nan")
    accuracy = GroupAccuracy(**summarize(class_accuracy, overall, class_counts, thresholds), top5=top5)
    intervals = None
    if bootstrap:
        intervals = {key: tuple(bounds) for key, bounds in
                     bootstrap_intervals(predictions, labels, class_counts, thresholds, resamples=bootstrap,
                                         seed=seed).items()}
    return Evaluation(accuracy=accuracy,
                      calibration=calibration_from(rows.confidence, predictions, labels, class_counts, thresholds),
                      temperature=temperature,
                      calibrated=calibration_from(rows.scaled_confidence, predictions, labels, class_counts,
                                                  thresholds),
                      shifted_priors=shifted_prior_accuracy(class_accuracy, class_counts), intervals=intervals,
                      per_class=tuple(float(v) for v in class_accuracy), **_confusions(predictions, labels,
                                                                                       len(class_counts)))


def _confusions(predictions, labels, classes: int) -> dict:
    """The Evaluation's per-class report and confusions (metrics.confusion)."""
    report = precision_recall_f1(predictions, labels, classes)
    matrix = (tuple(tuple(int(v) for v in line) for line in confusion_matrix(predictions, labels, classes))
              if classes <= MATRIX_CLASSES else None)
    return {"precision": tuple(float(v) for v in report["precision"]), "f1": tuple(float(v) for v in report["f1"]),
            "support": tuple(int(v) for v in report["support"]),
            "confused": tuple(confused_pairs(predictions, labels, classes)), "confusion": matrix}
