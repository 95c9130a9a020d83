"""Calibration (ECE) and bootstrap intervals, by hand and through compare."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke
from ltcache.metrics import bootstrap_intervals, calibration, evaluate, expected_calibration_error


def test_ece_by_hand():
    # Bin (0.8, 0.867]: confidences 0.85, 0.85, accuracy 1/2 -> gap 0.35, weight 2/4.
    # Bin (0.933, 1]: confidences 0.95, 0.95, both right -> gap 0.05, weight 2/4.
    confidence = np.array([0.85, 0.85, 0.95, 0.95])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(confidence, correct, bins=15) == pytest.approx(100 * (0.5 * 0.35 + 0.5 * 0.05))
    assert expected_calibration_error(np.array([0.7, 0.7]), np.array([1.0, 0.0]), bins=1) == pytest.approx(20.0)


def test_calibration_per_group_uses_the_samples_of_that_group():
    # Two classes: class 0 many-shot, class 1 few-shot. Logits give confidence 0.5 (uniform) everywhere.
    logits = torch.zeros(4, 2)
    labels = torch.tensor([0, 0, 1, 1])  # argmax of ties is class 0: class-0 samples right, class-1 wrong
    result = calibration(logits, labels, [500, 5])
    assert result["ece_many"] == pytest.approx(50.0)  # accuracy 1, confidence 0.5
    assert result["ece_few"] == pytest.approx(50.0)  # accuracy 0, confidence 0.5
    assert result["ece"] == pytest.approx(0.0)  # overall accuracy 0.5 matches confidence 0.5
    assert np.isnan(result["ece_medium"])


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_samples():
    generator = torch.Generator().manual_seed(0)
    widths = []
    for n in (200, 5000):
        labels = torch.randint(0, 4, (n,), generator=generator)
        predictions = torch.where(torch.rand(n, generator=generator) < 0.7, labels, (labels + 1) % 4)
        point = evaluate(predictions, labels, [200, 50, 10, 5])
        ci = bootstrap_intervals(predictions, labels, [200, 50, 10, 5], resamples=300)
        for key in ("all", "mean_per_class", "many", "medium", "few"):
            assert ci[key][0] <= point[key] <= ci[key][1]
        widths.append(ci["all"][1] - ci["all"][0])
    assert widths[1] < widths[0] / 3  # width shrinks like 1/sqrt(n): sqrt(25) = 5


def test_compare_reports_calibration_intervals_and_a_reliability_plot(toy_cache):
    result = invoke("compare", toy_cache, "--json", "--methods", "joint,tau_norm", "--bootstrap", "200")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for row in summary["rows"]:
        assert row["ci95"]["all"][0] <= row["all"] <= row["ci95"]["all"][1]
        assert 0 <= row["ece"] <= 100 and row["reliability"]
    assert (toy_cache / "reports" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    none = json.loads(invoke("compare", toy_cache, "--json", "--methods", "joint", "--bootstrap", "0").stdout)
    assert "ci95" not in none["rows"][0]


def test_shifted_prior_accuracy_by_hand():
    from ltcache.metrics import shifted_prior_accuracy

    # Ranks by train count 0, 1, 2; forward prior at IF 2 is 2^(-rank/2) = 1, 0.7071, 0.5 (normalized).
    result = shifted_prior_accuracy(np.array([100.0, 50.0, 0.0]), [30, 20, 10], imbalance_factors=(2,))
    prior = np.array([1.0, 2**-0.5, 0.5])
    assert result["forward_2"] == pytest.approx((100 * prior[0] + 50 * prior[1]) / prior.sum())
    assert result["backward_2"] == pytest.approx((100 * prior[2] + 50 * prior[1]) / prior.sum())


def test_seeds_refit_stochastic_methods_only(toy_cache):
    result = invoke("compare", toy_cache, "--json", "--methods", "joint,crt", "--seeds", "3", "--bootstrap", "0",
                    "--set", "crt.min_steps=50")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    assert "seeds" not in rows["joint"]
    stats = rows["crt"]["seeds"]
    assert stats["n"] == 3 and stats["seeds"] == [0, 1, 2] and len(stats["all"]["values"]) == 3
    assert stats["all"]["values"][0] == rows["crt"]["all"]  # the first seed is the reported fit
    low, high = stats["all"]["ci95"]
    assert low <= stats["all"]["mean"] <= high
    assert set(rows["crt"]["shifted_priors"]) >= {"forward_50", "backward_50"}
    assert_clean_error(invoke("compare", toy_cache, "--seeds", "0"), "--seeds must be >= 1")


def test_temperature_scaling_recovers_a_known_overconfidence():
    from ltcache.metrics import fit_temperature

    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(20_000, 5, generator=generator)
    labels = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=generator).squeeze(1)
    # Labels drawn from softmax(z): logits 4z are 4x overconfident, and T must come out near 4.
    assert abs(fit_temperature(4 * calibrated, labels) - 4.0) < 0.2
    assert abs(fit_temperature(calibrated, labels) - 1.0) < 0.05


def test_compare_reports_temperature_scaled_ece_fitted_off_test(toy_cache):
    rows = json.loads(invoke("compare", toy_cache, "--json", "--methods", "joint,ncm", "--bootstrap", "0").stdout)
    for row in rows["rows"]:
        assert row["temperature"] > 0 and 0 <= row["ece_ts"] <= 100
    ncm = {row["method"]: row for row in rows["rows"]}["ncm"]
    assert ncm["temperature"] < 0.5  # cosine logits in [-1, 1] need sharpening
