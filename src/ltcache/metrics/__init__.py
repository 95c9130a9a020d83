"""Metrics, split by concern: accuracy (groups, intervals), calibration (ECE, temperature), priors (shifted test
priors, target priors), and the one evaluator that combines them into a typed `Evaluation`. Importing this package
does not import torch."""

from ltcache.metrics.accuracy import (
    GROUPS,
    GroupAccuracy,
    ShotThresholds,
    bootstrap_intervals,
    evaluate,
    group_accuracy,
    per_class_accuracy,
    shot_groups,
    summarize,
    to_numpy,
)
from ltcache.metrics.calibration import (
    Calibration,
    calibration,
    expected_calibration_error,
    fit_temperature,
    max_softmax,
    reliability_bins,
)
from ltcache.metrics.evaluation import Evaluation, evaluate_logits
from ltcache.metrics.priors import (
    SHIFT_FACTORS,
    long_tailed_prior,
    parse_prior,
    prior_accuracy,
    shifted_prior_accuracy,
    shifted_priors,
)

__all__ = ["GROUPS", "SHIFT_FACTORS", "Calibration", "Evaluation", "GroupAccuracy", "ShotThresholds",
           "bootstrap_intervals", "calibration", "evaluate", "evaluate_logits", "expected_calibration_error",
           "fit_temperature", "group_accuracy", "long_tailed_prior", "max_softmax", "parse_prior", "per_class_accuracy",
           "prior_accuracy", "reliability_bins", "shifted_prior_accuracy", "shifted_priors", "shot_groups",
           "summarize", "to_numpy"]
