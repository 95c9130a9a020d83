"""Heads from recent long-tail work on frozen features, each against a reference computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    fitted = fit_method("gda", data, {"shrinkages": (0.001, 0.1, 0.9), "shrinkage": "grid", "normalize": False})
    best = max(fitted.curve, key=lambda entry: entry["mean_per_class"])
    assert fitted.chosen["shrinkage"] == best["shrinkage"]
    assert fitted.chosen["selection_mean_per_class"] == pytest.approx(best["mean_per_class"], abs=1e-4)
    ncm = fit_method("ncm", data, {"metric": "cosine", "features": "un"})
    assert data.selection_score(fitted.head) > data.selection_score(ncm.head) + 5


def test_gda_runs_in_compare_and_a_singular_covariance_is_a_clear_error(tmp_path):
    cache = write_toy_cache(tmp_path / "c", class_counts=(30, 12, 3), feature_dim=4)
    comparison = open_lab(cache).compare(["gda", "ncm"], bootstrap=0)
    rows = len(open_lab(cache).data.train)
    assert comparison.row("gda").chosen["shrinkage"] == pytest.approx(4 / (rows - 1 + 4), abs=1e-6)  # d / (N-1+d)
    assert comparison.row("gda").chosen["shrinkage_rule"] == "closed_form"
    assert comparison.row("gda").evaluation.mean_per_class > 90
    wide = write_toy_cache(tmp_path / "wide", class_counts=(4, 3, 2), feature_dim=40)  # 9 rows in 40 dimensions
    result = invoke("compare", wide, "--methods", "gda", "--set", "gda.shrinkage=grid", "--set", "gda.shrinkages=0",
                    "--bootstrap", "0")
    assert_clean_error(result, "singular", "gda.shrinkages")


def official_gda_logits(train, labels, queries, num_classes: int) -> torch.Tensor:
    """mrflogs/ICLR24 main_few_shots.py, run(): L2-normalized features, class means, the covariance of the
    class-centred rows, d * pinv((N - 1) C + tr(C) I), a uniform prior (in float64 here)."""
    vecs = F.normalize(train.double(), dim=1)
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(num_classes)])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(num_classes)])
    cov = center_vecs.T.cov()
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv((center_vecs.shape[0] - 1) * cov
                                                       + cov.trace() * torch.eye(center_vecs.shape[1]).double())
    ps = torch.ones(num_classes).double() / num_classes
    weight = torch.einsum("nd, dc -> cn", mus, cov_inv)
    bias = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return F.normalize(queries.double(), dim=1) @ weight + bias


def test_gda_equals_the_official_computation():
    from test_reference import toy_data

    data = toy_data(seed=7, text=True)
    train, val = data.train, data.val
    gda = official_gda_logits(train.features, train.labels, val.features, 4)
    constant = math.log(1 / 4)  # the uniform prior's log(1/C), the same for every class, left out by ltcache
    alone = fit_method("gda", data, {"zero_shot": False})
    assert alone.chosen["shrinkage_rule"] == "closed_form" and alone.chosen["normalize"]
    assert torch.allclose(alone.head.logits(val.features).double(), gda - constant, atol=1e-4, rtol=1e-4)
    # With the text head: zero-shot + alpha * GDA, alpha the first best on val over the official grid.
    zero_shot = data.text.logits(val.features).double()
    best_alpha, best = None, -1.0
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        accuracy = ((zero_shot + alpha * gda).argmax(1) == val.labels).double().mean().item()
        if accuracy > best:
            best_alpha, best = alpha, accuracy
    fitted = fit_method("gda", data)
    assert fitted.chosen["alpha"] == best_alpha and fitted.chosen["zero_shot"]
    expected = zero_shot + best_alpha * (gda - constant)
    assert torch.allclose(fitted.head.logits(val.features).double(), expected, atol=1e-3, rtol=1e-4)


def official_search_temperature(logits: torch.Tensor, labels: torch.Tensor, thres: float, weights=None) -> float:
    """GLA's trainers/util.py Calibrater.search_T / search_recurse, written again: a T with the mean confidence within
    `thres` points of the accuracy; `weights` (per class) reweighs the rows in both means (ltcache's calibration of
    the joint head to the train prior; the card says why)."""
    w = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights[labels].double()
    w = w / w.sum()
    accuracy = 100 * (w * (logits.argmax(1) == labels).double()).sum().item()

    def confidence(t):
        return 100 * (w * torch.softmax(logits / t, 1).max(1).values.double()).sum().item()

    t_min, t_max = 0.1, 10.0
    for _ in range(200):
        gap_min, gap_max = abs(confidence(t_min) - accuracy), abs(confidence(t_max) - accuracy)
        a = gap_min / (gap_min + gap_max)
        t_mid = t_min * (1 - a) + t_max * a
        if abs(confidence(t_mid) - accuracy) <= thres:
            return t_mid
        if confidence(t_max) > accuracy:
            t_max *= 1.1
        elif confidence(t_min) < accuracy:
            t_min /= 1.1
        elif gap_min < gap_max:
            t_max = t_mid
        else:
            t_min = t_mid
    raise AssertionError("the official search did not converge")


def simplex_prior(logits: torch.Tensor, labels: torch.Tensor, steps: int = 20000, rate: float = 0.5) -> torch.Tensor:
    """argmin over the simplex of CE(z - log q, y) (GLA's pp_solver), by exponentiated gradient: an independent
    solver of the same problem (the official one is cooper's Lagrangian SGD)."""
    q = torch.full((logits.shape[1],), 1.0 / logits.shape[1], dtype=torch.float64)
    z = logits.double()
    for _ in range(steps):
        p = torch.softmax(z - q.log(), 1)
        # d/dq_k of mean_i [log q_yi - z_iyi + logsumexp_j (z_ij - log q_j)] = (freq_k - mean_i p_ik) / q_k
        grad = (torch.bincount(labels, minlength=len(q)).double() / len(labels) - p.mean(0)) / q
        q = q * torch.exp(-rate * q * grad)
        q = q / q.sum()
    return q.log()


def test_gla_equals_a_hand_written_official_recipe():
    from test_reference import COUNTS, toy_data

    data = toy_data(seed=8, text=True)
    val = data.val
    joint, zero_shot = data.joint.logits(val.features), data.text.logits(val.features)
    t_zs = official_search_temperature(zero_shot, val.labels, thres=0.1)  # the zero-shot head: 0.1 points
    to_train_prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS) * len(COUNTS)  # val is balanced
    t_ft = official_search_temperature(joint, val.labels, thres=1.0, weights=to_train_prior)  # 1 point, GLA.test
    log_q = simplex_prior(zero_shot / t_zs, val.labels)
    log_p = torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS))  # gla_inference's p

    fitted = fit_method("gla", data)
    chosen = fitted.chosen
    assert chosen["calibrate"] and chosen["estimate_on"] == "val" and chosen["selected_on"] == "val"
    # the official searches stop within 0.1 (zero-shot) and 1 point (joint) of the target; ltcache solves it
    assert chosen["temperature_zero_shot"] == pytest.approx(t_zs, rel=0.03)
    assert chosen["temperature_joint"] == pytest.approx(t_ft, rel=0.15)
    from test_reference import toy_data as more

    queries = torch.cat([val.features, more(seed=9).val.features, more(seed=10).val.features])
    reference = (data.joint.logits(queries).double() / t_ft - log_p + data.text.logits(queries).double() / t_zs
                 - log_q)
    ours = fitted.head.logits(queries).double()
    agree = (ours.argmax(1) == reference.argmax(1)).double().mean().item()
    assert agree >= 0.97, agree
    # with ltcache's own temperatures the same formula is exact, and log q is the simplex optimum
    exact = (data.joint.logits(queries).double() / chosen["temperature_joint"] - log_p
             + data.text.logits(queries).double() / chosen["temperature_zero_shot"]
             - simplex_prior(zero_shot / chosen["temperature_zero_shot"], val.labels))
    assert torch.allclose(ours - ours.mean(1, keepdim=True), exact - exact.mean(1, keepdim=True), atol=2e-3)


def over_sharp_zero_shot(seed: int = 0, rows: int = 4000):
    """6 classes on the unit sphere with a constant last coordinate (so a linear head on normalized features can carry
    a per-class bias). The joint head is the train prior's calibrated classifier; the zero-shot head is a
    misaligned, pretraining-biased one whose logits are twice too sharp."""
    from ltcache.cache import Split
    from ltcache.heads import LinearHead

    generator = torch.Generator().manual_seed(seed)
    classes, dim, constant = 6, 7, 0.5
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    train_prior = torch.tensor([0.45, 0.25, 0.14, 0.08, 0.05, 0.03])
    pretrain_prior = train_prior.flip(0)
    radius = math.sqrt(1 - constant**2)

    def draw(labels):
        u = F.normalize(3 * centres[labels] + 1.5 * torch.randn(len(labels), dim, generator=generator), dim=1)
        return torch.cat([radius * u, torch.full((len(labels), 1), constant)], 1)

    train_labels = torch.multinomial(train_prior, rows, replacement=True, generator=generator)
    val_labels, test_labels = torch.arange(classes).repeat_interleave(60), torch.arange(classes).repeat_interleave(400)
    text_directions = F.normalize(centres + 0.6 * torch.randn(classes, dim, generator=generator), dim=1)
    sharp = 2.0
    text = torch.cat([sharp * 4 * text_directions / radius, (sharp * pretrain_prior.log() / constant)[:, None]], 1)
    joint = torch.cat([5 * centres / radius, (train_prior.log() / constant)[:, None]], 1)
    counts = torch.bincount(train_labels, minlength=classes).numpy()
    data = lab_data(joint, torch.zeros(classes), draw(train_labels), train_labels, counts,
                    val=Split(draw(val_labels), val_labels))
    data.text = LinearHead(text, None, normalize_input=True)
    return data, Split(draw(test_labels), test_labels)


def test_the_uncalibrated_gla_loses_on_an_over_sharp_zero_shot_head():
    data, test = over_sharp_zero_shot()

    def mean_per_class(head):
        predictions = head.predict(test.features)
        return 100 * np.mean([(predictions[test.labels == c] == c).float().mean().item() for c in range(6)])

    official = fit_method("gla", data)
    earlier = fit_method("gla", data, {"calibrate": False, "estimate_on": "train"})  # ltcache before issue 19
    assert official.chosen["temperature_zero_shot"] > 1.4  # the over-sharp head is found out
    assert mean_per_class(official.head) >= mean_per_class(earlier.head) + 4  # 69.75 against 60.79 when written
    assert mean_per_class(official.head) > mean_per_class(fit_method("joint", data).head) + 4


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
