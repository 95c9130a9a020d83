"""metrics/: calibration (ECE, temperature), bootstrap intervals and shifted or target priors, by hand and through
compare."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke, lab_data
from ltcache.cache import Split
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
    assert result.ece_many == pytest.approx(50.0)  # accuracy 1, confidence 0.5
    assert result.ece_few == pytest.approx(50.0)  # accuracy 0, confidence 0.5
    assert result.ece == pytest.approx(0.0)  # overall accuracy 0.5 matches confidence 0.5
    assert np.isnan(result.ece_medium)


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
    assert_clean_error(invoke("compare", toy_cache, "--seeds", "0"), "--seeds must be an integer >= 1")


def test_temperature_scaling_recovers_a_known_overconfidence():
    from ltcache.metrics import fit_temperature

    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(20_000, 5, generator=generator)
    labels = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=generator).squeeze(1)
    # Labels drawn from softmax(z): logits 4z are 4x overconfident, and T must come out near 4.
    assert abs(fit_temperature(4 * calibrated, labels) - 4.0) < 0.2
    assert abs(fit_temperature(calibrated, labels) - 1.0) < 0.05


def test_temperature_is_the_minimizer_of_the_nll_on_a_fine_grid():
    from ltcache.metrics import fit_temperature

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, 7, generator=generator) * 3
    # Labels follow softmax(logits / 5) with a third of them replaced at random: the best T is above 5.
    labels = torch.multinomial(torch.softmax(logits / 5, 1), 1, generator=generator).squeeze(1)
    noise = torch.rand(3000, generator=generator) < 1 / 3
    labels[noise] = torch.randint(0, 7, (int(noise.sum()),), generator=generator)
    grid = torch.linspace(0.5, 40.0, 7901, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits.double() / t, labels) for t in grid])
    best = grid[nll.argmin()].item()
    found = fit_temperature(logits, labels, rows=500)
    assert 5.0 < best < 39.0 and abs(found - best) < 0.01


def test_compare_reports_temperature_scaled_ece_fitted_off_test(toy_cache):
    rows = json.loads(invoke("compare", toy_cache, "--json", "--methods", "joint,ncm", "--bootstrap", "0").stdout)
    for row in rows["rows"]:
        assert row["temperature"] > 0 and 0 <= row["ece_ts"] <= 100
    ncm = {row["method"]: row for row in rows["rows"]}["ncm"]
    assert ncm["temperature"] < 0.5  # cosine logits in [-1, 1] need sharpening


def test_parse_prior_specs_and_files(tmp_path):
    from ltcache.core.errors import LtcacheError
    from ltcache.metrics import long_tailed_prior, parse_prior

    counts = [30, 20, 10]
    np.testing.assert_allclose(parse_prior("uniform", counts), [1 / 3] * 3)
    np.testing.assert_allclose(parse_prior("train", counts), [0.5, 1 / 3, 1 / 6])
    np.testing.assert_allclose(parse_prior("forward:2", counts), np.array([1.0, 2**-0.5, 0.5]) / (1.5 + 2**-0.5))
    np.testing.assert_allclose(parse_prior("backward:2", counts), long_tailed_prior(counts, 2, "backward"))
    (tmp_path / "p.json").write_text("[1, 1, 2]")
    (tmp_path / "p.txt").write_text("1\n1\n2\n")
    np.save(tmp_path / "p.npy", np.array([1.0, 1.0, 2.0]))
    for name in ("p.json", "p.txt", "p.npy"):
        np.testing.assert_allclose(parse_prior(str(tmp_path / name), counts), [0.25, 0.25, 0.5])
    missing = str(tmp_path / "p.json") + "x"
    for bad, fragment in (("forward:0.5", ">= 1"), ("sideways:3", "neither"), (missing, "neither")):
        with pytest.raises(LtcacheError, match=fragment):
            parse_prior(bad, counts)
    (tmp_path / "short.json").write_text("[1, 2]")
    with pytest.raises(LtcacheError, match="3 finite non-negative weights"):
        parse_prior(str(tmp_path / "short.json"), counts)


def _two_gaussians(n_per_class: int, prior, seed: int):
    """1-D classes N(-1, 1) and N(+1, 1); the joint head's logits are the log-likelihoods plus log(train prior)."""
    generator = torch.Generator().manual_seed(seed)
    counts = np.round(np.asarray(prior) * n_per_class * 2).astype(int)
    labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(counts)])
    features = (2.0 * labels - 1.0)[:, None] + torch.randn(len(labels), 1, generator=generator)
    return Split(features, labels)


def test_logit_adjustment_toward_a_target_prior():
    """Joint logits calibrated to a 9:1 train prior. Aimed at the train prior with tau = 1, logit adjustment
    gives the joint head back; aimed at a backward prior, it beats the balance-aimed head under that prior."""
    from ltcache.metrics import parse_prior, per_class_accuracy, prior_accuracy
    from ltcache.stage2 import LinearHead, fit_method

    train = _two_gaussians(5000, [0.9, 0.1], seed=0)
    # log N(x; mu_c, 1) = x mu_c - mu_c^2 / 2 + const: W = mu, b = -mu^2/2 + log(train prior)
    joint = LinearHead(torch.tensor([[-1.0], [1.0]]), torch.tensor([-0.5 + np.log(0.9), -0.5 + np.log(0.1)]))
    data = lab_data(joint.weight, joint.bias, train.features, train.labels, [9000, 1000],
                    val=_two_gaussians(20000, [0.5, 0.5], seed=1))
    aimed_at_train = fit_method("logit_adj", data, {"taus": (1.0,), "target": "train"}).head
    test = _two_gaussians(20000, [0.5, 0.5], seed=2)
    torch.testing.assert_close(aimed_at_train.logits(test.features), joint.logits(test.features))

    target = parse_prior("backward:20", data.class_counts)
    adapted = fit_method("logit_adj", data, {"target": "backward:20"})
    balanced = fit_method("logit_adj", data, {})
    assert adapted.chosen["target"] == "backward:20" and "selection_target_accuracy" in adapted.chosen

    def under_target(head):
        return prior_accuracy(per_class_accuracy(head.predict(test.features), test.labels, 2), target)

    assert under_target(adapted.head) > under_target(balanced.head) + 2.0


def test_compare_reports_logit_adjustment_aimed_at_each_shifted_prior(toy_cache):
    result = invoke("compare", toy_cache, "--json", "--methods", "joint,logit_adj", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    adapted = rows["logit_adj"]["shifted_priors_adapted"]
    assert set(adapted) == set(rows["logit_adj"]["shifted_priors"]) and "shifted_priors_adapted" not in rows["joint"]
    assert all(0.0 <= value <= 100.0 + 1e-9 for value in adapted.values())  # a sum of prior-weighted percentages
    markdown = (toy_cache / "reports" / "results.md").read_text()
    assert "### Shifted test priors" in markdown and "| logit_adj → the prior |" in markdown


def test_max_softmax_in_chunks_equals_the_softmax_maximum():
    from ltcache.metrics import max_softmax

    logits = torch.randn(101, 9, generator=torch.Generator().manual_seed(0)) * 5
    for temperature in (1.0, 0.3, 4.0):
        confidence, predictions = max_softmax(logits, temperature, rows=16)
        expected, expected_predictions = torch.softmax(logits / temperature, 1).max(1)
        torch.testing.assert_close(confidence, expected)
        assert torch.equal(predictions, expected_predictions)


def test_harmonic_geometric_means_and_top5_by_hand():
    from ltcache.metrics import ShotThresholds, summarize
    from ltcache.metrics.evaluation import top_k_accuracy

    result = summarize(np.array([50.0, 100.0, np.nan]), 70.0, [200, 50, 5], ShotThresholds())
    assert result["harmonic_mean"] == pytest.approx(2 / (1 / 50 + 1 / 100))  # the class with no samples is left out
    assert result["geometric_mean"] == pytest.approx((50 * 100) ** 0.5)
    assert summarize(np.array([0.0, 100.0]), 50.0, [200, 5], ShotThresholds())["harmonic_mean"] == 0.0
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([4, 0, 1])  # rank 5, rank 6 (out), rank 5
    assert top_k_accuracy(logits, labels, 5) == pytest.approx(200 / 3)
    assert top_k_accuracy(logits[:, :3], torch.tensor([2, 0, 1]), 5) == 100.0  # k capped at the class count
