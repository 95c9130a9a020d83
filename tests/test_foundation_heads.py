"""Heads from recent long-tail work on frozen features, each against a reference computation."""

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from conftest import assert_clean_error, invoke, lab_data, write_toy_cache
from ltcache.lab import open_lab
from ltcache.stage2 import fit_method
from ltcache.stage2.methods.foundation import class_statistics, gda_head


def _anisotropic(counts, dim=6, seed=0):
    """Gaussian classes sharing one strongly anisotropic covariance: where LDA beats nearest class mean."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) * torch.logspace(0, 1.3, dim)[None, :]
    centers = torch.randn(len(counts), dim, generator=generator) * 2
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    features = centers[labels] + torch.randn(len(labels), dim, generator=generator) @ mixing.T
    return features, labels


@pytest.mark.parametrize("shrinkage", [0.0, 0.05, 0.5])
def test_gda_head_equals_scikit_learns_lda_with_the_train_prior_removed(shrinkage):
    counts = [60, 25, 9, 4]
    features, labels = _anisotropic(counts)
    means, covariance = class_statistics(features, labels, len(counts))
    head = gda_head(means, covariance, shrinkage)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(features.numpy().astype(np.float64),
                                                                                    labels.numpy())
    prior = np.log(np.asarray(counts) / sum(counts))
    np.testing.assert_allclose(head.weight.numpy(), reference.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.bias.numpy(), reference.intercept_ - prior, rtol=1e-4, atol=1e-4)


def test_gda_chooses_the_shrinkage_with_the_best_selection_score_and_beats_ncm_on_shared_covariance():
    counts = [200, 80, 30, 10]
    features, labels = _anisotropic(counts, seed=1)
    val_features, val_labels = _anisotropic([50] * 4, seed=1)  # the same classes: same seed, same centres
    from ltcache.cache import Split

    data = lab_data(torch.zeros(4, 6), torch.zeros(4), features, labels, counts, val=Split(val_features, val_labels))
    fitted = fit_method("gda", data, {"shrinkages": (0.001, 0.1, 0.9)})
    best = max(fitted.curve, key=lambda entry: entry["mean_per_class"])
    assert fitted.chosen["shrinkage"] == best["shrinkage"]
    assert fitted.chosen["selection_mean_per_class"] == pytest.approx(best["mean_per_class"], abs=1e-4)
    ncm = fit_method("ncm", data)
    assert data.selection_score(fitted.head) > data.selection_score(ncm.head) + 5


def test_gda_runs_in_compare_and_a_singular_covariance_is_a_clear_error(tmp_path):
    cache = write_toy_cache(tmp_path / "c", class_counts=(30, 12, 3), feature_dim=4)
    comparison = open_lab(cache).compare(["gda", "ncm"], bootstrap=0)
    assert comparison.row("gda").chosen["shrinkage"] in (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4, 0.7)
    assert comparison.row("gda").evaluation.mean_per_class > 90
    wide = write_toy_cache(tmp_path / "wide", class_counts=(4, 3, 2), feature_dim=40)  # 9 rows in 40 dimensions
    result = invoke("compare", wide, "--methods", "gda", "--set", "gda.shrinkages=0", "--bootstrap", "0")
    assert_clean_error(result, "singular", "gda.shrinkages")


def test_cos_la_loss_is_the_hand_computed_logit_adjusted_ce_and_starts_from_the_class_means():
    from ltcache.stage2.modules import BalancedSoftmax, CosineClassifier

    counts = [8, 2]
    logits = torch.tensor([[2.0, 1.0], [0.5, 1.5]])
    targets = torch.tensor([0, 1])
    adjusted = logits + 0.5 * torch.log(torch.tensor([0.8, 0.2]))  # tau = 0.5
    by_hand = -(adjusted.log_softmax(1)[[0, 1], [0, 1]]).mean()
    assert BalancedSoftmax(counts, tau=0.5)(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    module = CosineClassifier(2, 2, 25.0, "cpu", learn_scale=False, weight=torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    assert not any(p is module.scale for p in module.parameters())  # a fixed scale is no parameter
    out = module(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[25 / 2**0.5, 25 / 2**0.5]]))


def test_cos_la_trains_on_instance_batches_and_the_adjusted_loss_lifts_the_tail(tmp_path):
    cache = write_toy_cache(tmp_path / "c", class_counts=[int(300 * 0.5**i) for i in range(8)], feature_dim=8,
                            noise=1.2)  # 300 .. 2 train images per class
    lab = open_lab(cache)
    adjusted, plain = lab.fit("cos_la"), lab.fit("cos_la", tau=0.0)  # tau 0: plain CE on the same batches
    assert adjusted.chosen["sampling"] == "instance" and adjusted.chosen["init"] == "means"
    assert adjusted.chosen["scale"] == 25.0 and adjusted.chosen["tau"] == 1.0
    with_la, without = lab.score(adjusted), lab.score(plain)
    assert with_la.few >= without.few + 10  # 70.0 against 55.0 when written
    assert with_la.mean_per_class > without.mean_per_class
