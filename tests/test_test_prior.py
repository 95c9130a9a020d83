"""compare --test-prior: test accuracy under a shifted class prior (SADE's forward / backward long-tailed test sets),
by reweighting the balanced test set's per-class accuracies or by subsampling it, against hand computations."""

import json

import numpy as np
import pytest

from conftest import assert_clean_error, checksum, invoke, write_toy_cache
from ltcache.lab import open_lab
from ltcache.metrics.priors import accuracy_under_prior, long_tailed_prior, subsample_to_prior


def test_reweighting_is_the_prior_weighted_per_class_accuracy():
    labels = np.repeat(np.arange(4), 10)
    predictions = labels.copy()
    predictions[[0, 1, 10, 20, 21, 22, 30, 31, 32, 33]] = 9  # class accuracies 80, 90, 70, 60
    counts = [200, 50, 10, 5]  # many, medium, few, few
    prior = long_tailed_prior(counts, 10, "backward")
    result = accuracy_under_prior(predictions, labels, counts, prior, mode="reweight")
    accuracy = np.array([80.0, 90.0, 70.0, 60.0])
    assert result["all"] == pytest.approx(float((prior * accuracy).sum()))
    assert result["many"] == pytest.approx(80.0) and result["medium"] == pytest.approx(90.0)
    assert result["few"] == pytest.approx((prior[2] * 70 + prior[3] * 60) / (prior[2] + prior[3]))
    assert result["mean_per_class"] == pytest.approx(75.0) and result["rows"] == 40
    uniform = accuracy_under_prior(predictions, labels, counts, np.full(4, 0.25), mode="reweight")
    assert uniform["all"] == pytest.approx(75.0)  # a uniform prior on a balanced test set: plain accuracy


def test_subsampling_draws_each_class_in_proportion_to_the_prior_with_the_seed():
    labels = np.repeat(np.arange(5), 20)
    prior = long_tailed_prior([100, 50, 25, 12, 6], 10, "forward")
    rows = subsample_to_prior(labels, prior, seed=3)
    kept = np.bincount(labels[rows], minlength=5)
    assert kept.tolist() == [max(1, round(20 * p / prior.max())) for p in prior]
    assert np.array_equal(rows, subsample_to_prior(labels, prior, seed=3))  # seeded
    assert not np.array_equal(rows, subsample_to_prior(labels, prior, seed=4))
    predictions = np.where(labels % 2 == 0, labels, 0)
    result = accuracy_under_prior(predictions, labels, [100, 50, 25, 12, 6], prior, mode="subsample", seed=3)
    assert result["all"] == pytest.approx(100.0 * float((predictions[rows] == labels[rows]).mean()))
    assert result["rows"] == len(rows)


def test_compare_reports_the_shifted_prior_beside_the_balanced_numbers(tmp_path):
    cache = write_toy_cache(tmp_path / "c", class_counts=(120, 40, 8), feature_dim=6, noise=1.5, val_per_class=10)
    result = invoke("compare", cache, "--methods", "joint,ncm", "--test-prior", "backward:10", "--bootstrap", "0",
                    "--json", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    lab = open_lab(cache)
    for row in rows:
        assert row["test_prior"]["prior"] == "backward:10" and row["test_prior"]["mode"] == "reweight"
        head = lab.fit(row["method"]).head
        expected = lab.prior_accuracy(head, long_tailed_prior(lab.data.class_counts, 10, "backward"), "x")
        assert row["test_prior"]["all"] == pytest.approx(expected["all"])
    csv_header = (tmp_path / "r" / "reports" / "results.csv").read_text().splitlines()[0]
    assert "test_prior_all" in csv_header
    assert "All, test prior backward:10" in (tmp_path / "r" / "reports" / "results.md").read_text()
    page = invoke("report", tmp_path / "r", "--out", tmp_path / "page")
    assert page.exit_code == 0, page.output
    assert "ncm (test prior backward:10)" in (tmp_path / "page" / "results.md").read_text()


def test_bad_test_priors_are_one_line_errors_and_write_nothing(tmp_path):
    cache = write_toy_cache(tmp_path / "c")
    before = checksum(tmp_path)
    for args, message in ((("--test-prior", "sideways:3"), "neither uniform, train, forward:F"),
                          (("--test-prior", "forward:0.5"), "must be a number >= 1"),
                          (("--test-prior", "forward:10", "--test-prior-mode", "resample"), "--test-prior-mode")):
        assert_clean_error(invoke("compare", cache, "--methods", "joint", "--bootstrap", "0", *args), message)
    assert checksum(tmp_path) == before
