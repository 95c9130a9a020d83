"""Top-1, mean per-class accuracy, and Many / Medium / Few shot groups (Sec. 5.1), all in percent."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltcache.errors import LtcacheError

GROUPS = ("many", "medium", "few")


@dataclass(frozen=True)
class ShotThresholds:
    """Many: more than `many` train images; Few: fewer than `few`; Medium: the rest (20-100 inclusive)."""

    many: int = 100
    few: int = 20


def shot_groups(class_counts, thresholds: ShotThresholds = ShotThresholds()) -> np.ndarray:
    """The group name of every class, from its train image count."""
    counts = np.asarray(class_counts)
    groups = np.full(len(counts), "medium", dtype=object)
    groups[counts > thresholds.many] = "many"
    groups[counts < thresholds.few] = "few"
    return groups


def per_class_accuracy(predictions, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class in percent; NaN for a class with no samples."""
    predictions = torch.as_tensor(predictions).cpu().numpy()
    labels = torch.as_tensor(labels).cpu().numpy()
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * correct / totals, np.nan)


def summarize(class_accuracy: np.ndarray, overall: float, class_counts, thresholds: ShotThresholds) -> dict:
    groups = shot_groups(class_counts, thresholds)
    result = {"all": float(overall), "mean_per_class": float(np.nanmean(class_accuracy))}
    for group in GROUPS:
        members = class_accuracy[groups == group]
        members = members[~np.isnan(members)]
        result[group] = float(members.mean()) if len(members) else float("nan")
        result[f"n_{group}"] = int((groups == group).sum())
    return result


def evaluate(predictions, labels, class_counts, thresholds: ShotThresholds = ShotThresholds()) -> dict:
    """All (top-1 over samples), mean per-class accuracy, and Many / Medium / Few (mean per-class within group)."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    overall = 100.0 * (predictions == labels).double().mean().item() if len(labels) else float("nan")
    return summarize(per_class_accuracy(predictions, labels, len(class_counts)), overall, class_counts, thresholds)


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


def max_softmax(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 8192):
    """Confidence (the largest softmax probability of logits / T) and prediction of each row, a chunk of rows at
    a time: no probability matrix the size of the logits is ever held."""
    confidence, predictions = [], []
    for chunk in logits.float().split(chunk_rows):
        peak, index = chunk.max(1)
        confidence.append(1.0 / (chunk - peak[:, None]).div_(temperature).exp_().sum(1))
        predictions.append(index)
    if not confidence:
        return logits.new_empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(confidence), torch.cat(predictions)


def calibration(logits: torch.Tensor, labels: torch.Tensor, class_counts,
                thresholds: ShotThresholds = ShotThresholds(), bins: int = 15, temperature: float = 1.0) -> dict:
    """ECE overall and over the test samples of each shot group, from softmax(logits / temperature)."""
    confidence, predictions = max_softmax(logits, temperature)
    confidence, labels_np = confidence.cpu().numpy(), labels.cpu().numpy()
    correct = (predictions.cpu().numpy() == labels_np).astype(np.float64)
    groups = shot_groups(class_counts, thresholds)[labels_np]
    result = {"ece": expected_calibration_error(confidence, correct, bins)}
    for group in GROUPS:
        members = groups == group
        result[f"ece_{group}"] = expected_calibration_error(confidence[members], correct[members], bins)
    result["reliability"] = reliability_bins(confidence, correct, bins)
    return result


def bootstrap_intervals(predictions, labels, class_counts, thresholds: ShotThresholds = ShotThresholds(), *,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of every metric of `evaluate`, resampling test samples with replacement."""
    predictions = torch.as_tensor(predictions).cpu()
    labels = torch.as_tensor(labels).cpu()
    num_classes = len(class_counts)
    correct = (predictions == labels).long()
    generator = torch.Generator().manual_seed(seed)
    draws = {key: [] for key in ("all", "mean_per_class", *GROUPS)}
    for _ in range(resamples):
        index = torch.randint(len(labels), (len(labels),), generator=generator)
        sample_labels, sample_correct = labels[index], correct[index]
        totals = torch.bincount(sample_labels, minlength=num_classes).double().numpy()
        hits = torch.bincount(sample_labels, weights=sample_correct.double(), minlength=num_classes).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(totals > 0, 100.0 * hits / totals, np.nan)
        summary = summarize(per_class, 100.0 * sample_correct.double().mean().item(), class_counts, thresholds)
        for key in draws:
            draws[key].append(summary[key])
    tail = 100 * (1 - level) / 2
    return {key: [float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))]
            if not np.all(np.isnan(values)) else [float("nan"), float("nan")] for key, values in draws.items()}


SHIFT_FACTORS = (2, 5, 10, 25, 50)


def long_tailed_prior(class_counts, factor: float, direction: str) -> np.ndarray:
    """A test prior pi_c ∝ factor^(-rank_c / (C - 1)), summing to 1. "forward" keeps the train order (frequent train
    classes stay frequent), "backward" reverses it; factor 1 is uniform."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    rank = np.empty(len(order), dtype=np.float64)
    rank[order] = np.arange(len(order))
    if direction == "backward":
        rank = rank.max() - rank
    elif direction != "forward":
        raise LtcacheError(f"a shifted prior's direction is forward or backward, got {direction!r}")
    prior = float(factor) ** (-rank / max(rank.max(), 1))
    return prior / prior.sum()


def shifted_priors(class_counts, imbalance_factors=SHIFT_FACTORS) -> dict[str, np.ndarray]:
    """forward_F and backward_F long-tailed test priors for every imbalance factor F."""
    return {f"{direction}_{factor}": long_tailed_prior(class_counts, factor, direction)
            for factor in imbalance_factors for direction in ("forward", "backward")}


def prior_accuracy(class_accuracy: np.ndarray, prior: np.ndarray) -> float:
    """sum_c pi_c * acc_c: the accuracy on a test set whose classes follow `prior`. Exact for a balanced test set
    reweighted per class."""
    return float((np.asarray(prior) * np.nan_to_num(class_accuracy, nan=0.0)).sum())


def shifted_prior_accuracy(class_accuracy: np.ndarray, class_counts, imbalance_factors=SHIFT_FACTORS) -> dict:
    """Accuracy if test followed a forward or backward long-tailed prior instead of a balanced one."""
    return {name: prior_accuracy(class_accuracy, prior)
            for name, prior in shifted_priors(class_counts, imbalance_factors).items()}


def parse_prior(spec, class_counts) -> np.ndarray:
    """A target class prior from its spec: uniform, train, forward:F, backward:F, a path to a .npy / .json / .txt
    file of one non-negative weight per class, or an array. Returned normalized to sum 1."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if not isinstance(spec, str):
        prior = np.asarray(spec, dtype=np.float64)
    elif spec == "uniform":
        prior = np.ones(len(counts))
    elif spec == "train":
        prior = counts.copy()
    elif spec.split(":")[0] in ("forward", "backward") and spec.count(":") == 1:
        direction, factor = spec.split(":")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not value >= 1:
            raise LtcacheError(f"target prior {spec!r}: the imbalance factor must be a number >= 1, e.g. "
                               f"{direction}:10")
        return long_tailed_prior(counts, value, direction)
    else:
        prior = _read_prior_file(spec)
    if prior.shape != counts.shape or not np.all(np.isfinite(prior)) or (prior < 0).any() or prior.sum() <= 0:
        raise LtcacheError(f"target prior {spec if isinstance(spec, str) else 'array'} must hold {len(counts)} "
                           "finite non-negative weights, one per class, not all zero")
    return prior / prior.sum()


def _read_prior_file(spec: str) -> np.ndarray:
    path = Path(spec)
    if not path.is_file():
        raise LtcacheError(f"target prior {spec!r} is neither uniform, train, forward:F, backward:F nor an existing "
                           ".npy / .json / .txt file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float64).ravel()
        if path.suffix == ".json":
            return np.asarray(json.loads(path.read_text()), dtype=np.float64).ravel()
        return np.loadtxt(path, dtype=np.float64, ndmin=1).ravel()
    except (ValueError, TypeError, OSError) as exc:
        raise LtcacheError(f"target prior file {path} is unreadable ({exc}); write one number per class") from None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 50, chunk_rows: int = 8192) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimizing the NLL of softmax(logits / T) on `labels`.

    The NLL is convex in beta = 1/T: its derivative is mean(E_p[z] - z_y) and its second derivative
    mean(Var_p[z]) >= 0. So a safeguarded Newton iteration on beta converges in a few passes over the logits,
    each computed a chunk of rows at a time (L-BFGS with a line search took seconds at ImageNet-LT shape).
    """
    logits = logits.detach().float()
    target = logits.gather(1, labels.detach()[:, None])[:, 0].double()
    low, high, beta = 0.0, math.inf, 1.0  # the minimizer lies in (low, high)
    for _ in range(steps):
        first = second = 0.0
        for chunk in logits.split(chunk_rows):
            p = torch.softmax(chunk * beta, dim=1)
            mean = (p * chunk).sum(1)
            first += mean.double().sum().item()
            second += ((p * chunk * chunk).sum(1) - mean * mean).double().sum().item()
        first = (first - target.sum().item()) / len(labels)
        second /= len(labels)
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
