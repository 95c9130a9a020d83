"""Calibration: expected calibration error (15 bins) overall and per shot group, reliability bins, and temperature
scaling (Guo et al. 2017). torch is imported inside the functions that need it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ltcache.logits import chunk_rows, exp_shifted_, labelled_blocks, row_blocks
from ltcache.metrics.accuracy import GROUPS, ShotThresholds, shot_groups

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Calibration:
    """ECE in percent over all test samples and over the samples of each shot group, and the reliability bins."""

    ece: float
    ece_many: float
    ece_medium: float
    ece_few: float
    reliability: list[dict] = field(default_factory=list)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017) in percent: sum over equal-width confidence bins of |B|/N * |acc(B) - conf(B)|."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return 100.0 * float(total)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Per bin: mean confidence, accuracy and count (for the reliability diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean()),
             "count": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def max_softmax(logits, temperature: float = 1.0, rows: int | None = None):
    """Confidence (the largest softmax probability of logits / T) and prediction of each row, a chunk of rows at
    a time: no probability matrix the size of the logits is ever held."""
    import torch

    confidence, predictions = [], []
    for chunk in row_blocks(logits, rows or chunk_rows(logits.shape[1])):
        peak, index = chunk.max(1)
        confidence.append(1.0 / exp_shifted_((chunk - peak[:, None]).div_(temperature)).sum(1))
        predictions.append(index)
    if not confidence:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(confidence), torch.cat(predictions)


def calibration(logits, labels: torch.Tensor, class_counts,
                thresholds: ShotThresholds = ShotThresholds(), bins: int = 15,
                temperature: float = 1.0) -> Calibration:
    """ECE overall and over the test samples of each shot group, from softmax(logits / temperature)."""
    confidence, predictions = max_softmax(logits, temperature)
    return calibration_from(confidence, predictions, labels, class_counts, thresholds, bins)


def calibration_from(confidence, predictions, labels, class_counts, thresholds: ShotThresholds = ShotThresholds(),
                     bins: int = 15) -> Calibration:
    """ECE overall and per shot group, and the reliability bins, from each row's confidence and prediction."""
    confidence, labels_np = np.asarray(confidence.cpu().numpy(), dtype=np.float32), labels.cpu().numpy()
    correct = (predictions.cpu().numpy() == labels_np).astype(np.float64)
    groups = shot_groups(class_counts, thresholds)[labels_np]
    per_group = {f"ece_{group}": expected_calibration_error(confidence[groups == group], correct[groups == group], bins)
                 for group in GROUPS}
    return Calibration(ece=expected_calibration_error(confidence, correct, bins), **per_group,
                       reliability=reliability_bins(confidence, correct, bins))


def fit_temperature(logits, labels: torch.Tensor, steps: int = 50, rows: int | None = None, reduce=None) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimizing the NLL of softmax(logits / T) on `labels`.

    The NLL is convex in beta = 1/T: its derivative is mean(E_p[z] - z_y) and its second derivative
    mean(Var_p[z]) >= 0. So a safeguarded Newton iteration on beta converges in a few passes over the logits,
    each computed a chunk of rows at a time (L-BFGS with a line search took seconds at ImageNet-LT shape).
    `reduce(list of floats) -> their sums over processes` (distributed.all_reduce_sum): under torchrun each rank
    passes its share of the rows and every rank gets the same T.
    """

    from ltcache.logits import BlockLogits

    reduce = reduce or list
    rows = rows or chunk_rows(logits.shape[1])
    if not isinstance(logits, BlockLogits):
        logits = logits.detach().float()
    labels = labels.detach()
    target = sum(chunk.gather(1, chunk_labels[:, None]).double().sum().item()
                 for chunk, chunk_labels in labelled_blocks(logits, labels, rows))
    target, count = reduce([target, float(len(labels))])
    if count == 0:
        return 1.0
    low, high, beta = 0.0, math.inf, 1.0  # the minimizer lies in (low, high)
    for _ in range(steps):
        first = second = 0.0
        for chunk in row_blocks(logits, rows):
            p = chunk * beta  # softmax, written out so that no exp is a subnormal float (exp_shifted_)
            p = exp_shifted_(p.sub_(p.amax(1, keepdim=True)))
            p.div_(p.sum(1, keepdim=True))
            mean = (p * chunk).sum(1)
            first += mean.double().sum().item()
            second += ((p * chunk * chunk).sum(1) - mean * mean).double().sum().item()
        first, second = reduce([first, second])
        first = (first - target) / count
        second /= count
        if first > 0:
            high = beta
        else:
            low = beta
        step = beta - first / second if second > 0 else math.nan
        beta = step if low < step < high else (2 * beta if math.isinf(high) else (low + high) / 2)
        if abs(first) < 1e-7 or (high - low) < 1e-9 * max(high, 1.0):
            break
    if not math.isfinite(beta) or beta <= 0:
        return 1.0
    return float(1.0 / beta)


def confidence_matched_temperature(logits, labels: torch.Tensor, *, class_weights=None, low: float = 1e-2,
                                   high: float = 1e2, steps: int = 60) -> float:
    """GLA's calibration (Zhu et al. 2023, official trainers/util.py `Calibrater`): the T at which the mean
    confidence (largest softmax probability of logits / T) equals the accuracy on `labels`. The mean confidence falls
    monotonically as T grows, so T is found by bisection on log T within [low, high] (an end of the range when the
    accuracy lies outside what T can reach). `class_weights` [C] weighs each row by its label's weight in both means
    (the rows reweighted to another label distribution). `logits` is a tensor or a BlockLogits, read once a step."""
    import torch

    if len(labels) == 0:
        return 1.0
    weights = torch.ones(len(labels), dtype=torch.float64, device=labels.device) if class_weights is None else \
        torch.as_tensor(class_weights, dtype=torch.float64, device=labels.device)[labels]
    weights = weights / weights.sum()
    _, predictions = max_softmax(logits)
    accuracy = (weights * (predictions.to(labels.device) == labels).double()).sum().item()

    def confidence(temperature: float) -> float:
        return (weights * max_softmax(logits, temperature)[0].to(labels.device).double()).sum().item()

    if confidence(low) <= accuracy:
        return low
    if confidence(high) >= accuracy:
        return high
    log_low, log_high = math.log(low), math.log(high)
    for _ in range(steps):
        middle = (log_low + log_high) / 2
        if confidence(math.exp(middle)) > accuracy:
            log_low = middle
        else:
            log_high = middle
    return float(math.exp((log_low + log_high) / 2))
