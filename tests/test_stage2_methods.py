"""stage2/methods: hand-computed cases for the methods beyond the paper's five, and selection honesty."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import invoke, lab_data
from ltcache.stage2 import METHODS, fit_method


def lab(weight, bias, features, labels, class_counts, select="val"):
    return lab_data(weight, bias, features, labels, class_counts, select=select)


def test_ncm_centered_mode_removes_a_shared_offset():
    # Both classes sit far along x; only the y sign separates them. Centering on the train mean (10, 0) exposes it.
    features = torch.tensor([[10.0, 1.0], [10.0, 2.0], [10.0, -1.0], [10.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    data = lab(torch.eye(2), torch.zeros(2), features, labels, [150, 5])
    head = fit_method("ncm", data, {"features": "cl2n", "metric": "cosine"}).head
    np.testing.assert_allclose(head.center.numpy(), [10.0, 0.0])
    np.testing.assert_allclose(head.weight.numpy(), [[0.0, 1.0], [0.0, -1.0]], atol=1e-6)
    assert head.predict(torch.tensor([[10.0, 0.1], [10.0, -0.1]])).tolist() == [0, 1]


def test_ncm_raw_euclidean_is_nearest_mean_on_raw_features():
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(60, 3, generator=generator) * 3, torch.arange(60) % 3
    data = lab(torch.eye(3), torch.zeros(3), features, labels, [20, 20, 20])
    head = fit_method("ncm", data, {"features": "un", "metric": "euclidean"}).head
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    queries = torch.randn(40, 3, generator=generator) * 3
    assert torch.equal(head.predict(queries), torch.cdist(queries, means).argmin(1))
    assert not head.normalize_input and head.center is None


def test_lws_with_bias_scales_the_bias_and_unit_scales_equal_joint():
    from ltcache.stage2.modules import ScaleLogits

    logits = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.equal(ScaleLogits(3, "cpu")(logits), logits)
    labels = torch.tensor([0] * 40 + [1] * 4)
    features = torch.cat([torch.tensor([[1.0, 0.3]]).repeat(40, 1), torch.tensor([[0.3, 1.0]]).repeat(4, 1)])
    # Logits with bias: class-1 samples (4, 1.2), class-0 samples (11, 0.5); solvable when 3.3 < f1/f0 < 22.
    bias = torch.tensor([1.0, 0.2])
    data = lab(torch.tensor([[10.0, 0.0], [0.0, 1.0]]), bias, features, labels, [40, 4])
    fitted = fit_method("lws", data, {"with_bias": "true", "epochs": 2, "min_steps": 200, "batch_size": 32})
    scales = fitted.head.weight.norm(dim=1) / torch.tensor([10.0, 1.0])
    np.testing.assert_allclose(fitted.head.bias.numpy(), (bias * scales).numpy(), rtol=1e-5)
    assert fitted.chosen["with_bias"] is True
    assert fitted.head.predict(features).tolist() == labels.tolist()


def test_logit_adjustment_by_hand():
    # Joint logits for one sample: (1.0, 0.5); prior (0.9, 0.1): tau = 1 subtracts log 0.9 and log 0.1.
    weight, bias = torch.eye(2), torch.zeros(2)
    features, labels = torch.tensor([[1.0, 0.5]]), torch.tensor([1])
    data = lab(weight, bias, features, labels, [90, 10])
    fitted = fit_method("logit_adj", data, {"taus": (0.0, 1.0)})
    assert [entry["mean_per_class"] for entry in fitted.curve] == [0.0, 100.0]  # 1.0 vs 0.5 - log 0.1 + log 0.9
    assert fitted.chosen["la_tau"] == 1.0
    np.testing.assert_allclose(fitted.head.bias.numpy(), -np.log([0.9, 0.1]), rtol=1e-6)
    at_zero = fit_method("logit_adj", data, {"taus": (0.0,)}).head  # tau = 0 is the joint head, bias kept
    assert torch.equal(at_zero.bias, bias) and torch.equal(at_zero.weight, weight)


def test_tau_norm_then_logit_adjustment_reduces_to_tau_norm_without_adjustment():
    generator = torch.Generator().manual_seed(2)
    features, labels = torch.randn(200, 5, generator=generator), torch.randint(0, 4, (200,), generator=generator)
    weight = torch.randn(4, 5, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5])[:, None]
    data = lab(weight, torch.zeros(4), features, labels, [300, 100, 30, 5])
    combined = fit_method("tau_norm_la", data, {"la_taus": (0.0,)})
    alone = fit_method("tau_norm", data)
    assert combined.chosen["tau"] == alone.chosen["tau"] and combined.chosen["la_tau"] == 0.0
    assert torch.equal(combined.head.predict(features), alone.head.predict(features))


def test_learned_tau_fixes_a_norm_bias():
    labels = torch.tensor([0] * 40 + [1] * 40)
    features = torch.cat([torch.tensor([[1.0, 0.6]]).repeat(40, 1), torch.tensor([[0.3, 1.0]]).repeat(40, 1)])
    data = lab(torch.tensor([[10.0, 0.0], [0.0, 1.0]]), torch.zeros(2), features, labels, [400, 4])
    assert (fit_method("joint", data).head.predict(features) == 1).sum() == 0  # class 1 is never predicted
    fitted = fit_method("tau_learned", data, {"epochs": 2, "min_steps": 300, "batch_size": 32})
    # Class 1 wins its samples once 10^(1 - tau) * 0.3 < 1, i.e. tau > 0.48.
    assert fitted.chosen["tau"] > 0.48
    assert fitted.head.predict(features).tolist() == labels.tolist()


def test_every_method_is_listed_and_runs_on_a_cache(toy_cache, tmp_path):
    from conftest import toy_steps, write_toy_cache

    listed = invoke("methods", "--json")
    assert listed.exit_code == 0
    entries = json.loads(listed.stdout)
    names = [entry["method"] for entry in entries]
    assert sorted(names) == sorted(METHODS) and names[:5] == ["joint", "ncm", "crt", "tau_norm", "lws"]
    steps = toy_steps()  # every trained method at 50 steps instead of its default 500
    assert len(steps) >= 2 * 10
    with_text = write_toy_cache(tmp_path / "text", text_head=True)  # as extract --zero-shot writes it
    result = invoke("compare", with_text, "--methods", "all", "--json", "--bootstrap", "0", *steps)
    assert result.exit_code == 0, result.output
    assert [row["method"] for row in json.loads(result.stdout)["rows"]] == names
    # Without a text head, --methods all is every other method.
    result = invoke("compare", toy_cache, "--methods", "all", "--json", "--bootstrap", "0", *steps)
    assert result.exit_code == 0, result.output
    text_methods = {entry["method"] for entry in entries if entry["needs_text_head"]}
    assert text_methods == {"zero_shot", "zs_ensemble", "gla", "tip_adapter", "tip_adapter_f", "lp_pp"}
    assert [row["method"] for row in json.loads(result.stdout)["rows"]] == [n for n in names if n not in text_methods]
    default = invoke("compare", toy_cache, "--json", "--bootstrap", "0", "--set", "crt.min_steps=50", "--set",
                     "lws.min_steps=50")
    default = json.loads(default.stdout)["rows"]
    assert [row["method"] for row in default] == ["joint", "ncm", "crt", "tau_norm", "lws"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_choices_never_depend_on_the_test_split(tmp_path, name):
    """Refit every method on a cache whose test labels are shuffled: what it chooses must not change."""
    from conftest import reseal, write_toy_cache
    from ltcache.cache import FeatureCache
    from ltcache.lab import compare

    text = METHODS[name].text  # the methods that read CLIP's text head get a cache with one
    first = write_toy_cache(tmp_path / "a", seed=3, text_head=text)
    second = write_toy_cache(tmp_path / "b", seed=3, text_head=text)
    test_shard = second / FeatureCache(second).manifest["splits"]["test"]["shards"][0]["file"]
    import h5py

    with h5py.File(test_shard, "r+") as f:
        f["labels"][:] = np.random.default_rng(0).permutation(f["labels"][:])
    reseal(second)
    params = {name: {"min_steps": 50}} if "min_steps" in METHODS[name].defaults else {}  # toy cache, toy steps
    rows = [compare(path, methods=[name], params=params, write_reports=False, bootstrap=0).as_dict()["rows"][0]
            for path in (first, second)]
    assert rows[0]["chosen"] == rows[1]["chosen"]
    assert rows[0]["temperature"] == rows[1]["temperature"]  # fitted on the selection split too


def test_label_aware_smoothing_by_hand():
    from ltcache.stage2.methods.retrain import label_aware_smoothing
    from ltcache.stage2.modules import SmoothedCrossEntropy

    eps = label_aware_smoothing([100, 50, 10], head=0.4, tail=0.1)
    np.testing.assert_allclose(eps.numpy(), [0.4, 0.1 + 0.3 * np.sin(np.pi / 2 * 40 / 90), 0.1], rtol=1e-6)
    logits, targets = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_p = torch.log_softmax(logits, 1)
    assert SmoothedCrossEntropy(torch.zeros(3))(logits, targets).item() == pytest.approx(-log_p[0, 0].item())
    assert SmoothedCrossEntropy(torch.ones(3))(logits, targets).item() == pytest.approx(-log_p.mean().item())


def _imbalanced_toy(seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 200 + [1] * 5)
    centers = torch.where(labels[:, None] == 0, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    features = centers + 0.3 * torch.randn(205, 2, generator=generator)
    return lab(torch.tensor([[1.0, 0.0], [0.0, 0.1]]), torch.tensor([5.0, 0.0]), features, labels, [200, 5])


@pytest.mark.parametrize("name", ["crt_bsm", "crt_las", "crt_maxnorm", "cos", "disalign", "mlp2", "mlp3"])
def test_crt_variants_recover_the_tail_class(name):
    data = _imbalanced_toy()
    overrides = {"epochs": 2, "min_steps": 300, "batch_size": 64}
    fitted = fit_method(name, data, overrides)
    tail = data.train.labels == 1
    assert (fit_method("joint", data).head.predict(data.train.features)[tail] == 1).float().mean() == 0.0
    assert (fitted.head.predict(data.train.features)[tail] == 1).float().mean() >= 0.8


def test_maxnorm_caps_every_row_and_reports_its_search():
    data = _imbalanced_toy()
    fitted = fit_method("crt_maxnorm", data, {"epochs": 1, "min_steps": 100, "max_norms": "0.5,1,2"})
    cap = fitted.chosen["max_norm"]
    assert fitted.head.weight.norm(dim=1).max().item() <= cap + 1e-5
    assert [entry["max_norm_multiple"] for entry in fitted.curve] == [0.5, 1.0, 2.0]
    assert fitted.chosen["max_norm_multiple"] in (0.5, 1.0, 2.0)


def test_cosine_classifier_head_is_scaled_unit_rows_on_normalized_features():
    fitted = fit_method("cos", _imbalanced_toy(), {"epochs": 1, "min_steps": 100})
    assert fitted.head.normalize_input and fitted.head.bias is None
    np.testing.assert_allclose(fitted.head.weight.norm(dim=1).numpy(), [fitted.chosen["scale"]] * 2, rtol=1e-4)
    assert fitted.chosen["steps"] == 100


def test_generalized_reweighting_by_hand():
    from ltcache.stage2.methods.nonlinear import generalized_reweighting

    # shares 0.8, 0.2 -> (1/0.8)^2 = 1.5625, (1/0.2)^2 = 25 -> mean 13.28125
    np.testing.assert_allclose(generalized_reweighting([80, 20], 2.0).numpy(), [1.5625 / 13.28125, 25 / 13.28125],
                               rtol=1e-6)
    np.testing.assert_allclose(generalized_reweighting([80, 20], 0.0).numpy(), [1.0, 1.0])


def test_disalign_head_by_hand_and_identity_at_init():
    from ltcache.heads import DisAlignHead

    weight, bias = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, -0.5])
    f = torch.tensor([[1.0, 1.0]])
    # z = (1.5, 1.5); gate = sigmoid(1*1 + 0*1 + 0) = 0.7311; calibrated = (2 * 1.5 + 0, 0.5 * 1.5 - 1)
    head = DisAlignHead(weight, bias, torch.tensor([2.0, 0.5]), torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.0]),
                        torch.tensor(0.0))
    gate = 1 / (1 + math.exp(-1.0))
    expected = [gate * 3.0 + (1 - gate) * 1.5, gate * -0.25 + (1 - gate) * 1.5]
    np.testing.assert_allclose(head.logits(f)[0].numpy(), expected, rtol=1e-6)
    identity = DisAlignHead(weight, bias, torch.ones(2), torch.zeros(2), torch.randn(2), torch.tensor(3.0))
    torch.testing.assert_close(identity.logits(f), f @ weight.T + bias)


def test_mlp_head_by_hand():
    from ltcache.heads import MLPHead

    head = MLPHead((torch.tensor([[1.0, -1.0], [0.5, 0.5]]), torch.tensor([[2.0, 1.0]])),
                   (torch.tensor([0.0, -2.0]), torch.tensor([0.25])))
    # f = (3, 1): hidden relu((3 - 1, 1.5 + 0.5 - 2)) = (2, 0) -> 2 * 2 + 1 * 0 + 0.25
    assert head.logits(torch.tensor([[3.0, 1.0]])).item() == pytest.approx(4.25)
    # f = (1, 3): hidden relu((1 - 3, 0.5 + 1.5 - 2)) = (0, 0) -> the output bias alone
    assert head.logits(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(0.25)


def test_mlp_hidden_width_defaults_to_the_feature_size():
    fitted = fit_method("mlp3", _imbalanced_toy(), {"epochs": 1, "min_steps": 10, "hidden": 0})
    assert [tuple(w.shape) for w in fitted.head.weights] == [(2, 2), (2, 2), (2, 2)]
    assert fitted.chosen["layers"] == 3 and fitted.chosen["hidden"] == 2
    wide = fit_method("mlp2", _imbalanced_toy(), {"epochs": 1, "min_steps": 10, "hidden": 16})
    assert [tuple(w.shape) for w in wide.head.weights] == [(16, 2), (2, 16)]


def test_a_diverging_fit_fails_with_a_hint():
    from ltcache.core.errors import LtcacheError

    with pytest.raises(LtcacheError, match="stopped being finite in epoch 1; lower the lr"):
        fit_method("crt", _imbalanced_toy(), {"epochs": 1, "min_steps": 20, "lr": 1e30})
