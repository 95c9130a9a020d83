"""Invariants as property tests (hypothesis), and heads that survive a save / reload unchanged."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import lab_data
from ltcache.cache import FeatureCache
from ltcache.lab import open_lab
from ltcache.stage2 import METHODS, LinearHead, fit_method
from ltcache.stage2.methods.weight_norms import tau_normalize
from ltcache.stage2.modules import ScaleLogits

SETTINGS = settings(max_examples=25, deadline=None)


def random_problem(seed: int, classes: int, dim: int, rows: int = 40):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator)
    weight = torch.randn(classes, dim, generator=generator) * torch.rand(classes, 1, generator=generator) * 3
    bias = torch.randn(classes, generator=generator)
    labels = torch.arange(rows) % classes
    counts = (torch.rand(classes, generator=generator) * 200 + 1).long().numpy()
    return features, labels, weight, bias, counts


def lab(features, labels, weight, bias, counts):
    return lab_data(weight, bias, features, labels, counts)


@SETTINGS
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 8), dim=st.integers(1, 16))
def test_tau_zero_and_unit_lws_scales_equal_joint_without_bias(seed, classes, dim):
    features, _, weight, _, _ = random_problem(seed, classes, dim)
    no_bias = features @ weight.T
    assert torch.equal(LinearHead(tau_normalize(weight, 0.0)).logits(features), no_bias)
    assert torch.equal(ScaleLogits(classes, "cpu")(no_bias), no_bias)


@SETTINGS
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 8), dim=st.integers(1, 16))
def test_logit_adjustment_at_tau_zero_is_the_joint_head(seed, classes, dim):
    features, labels, weight, bias, counts = random_problem(seed, classes, dim)
    head = fit_method("logit_adj", lab(features, labels, weight, bias, counts), {"taus": (0.0,)}).head
    torch.testing.assert_close(head.logits(features), features @ weight.T + bias)


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0), mode=st.sampled_from(["l2n", "cl2n"]))
def test_cosine_ncm_is_invariant_to_scaling_the_features(seed, scale, mode):
    features, labels, weight, bias, counts = random_problem(seed, 4, 6)
    base = fit_method("ncm", lab(features, labels, weight, bias, counts), {"features": mode, "metric": "cosine"}).head
    scaled = fit_method("ncm", lab(features * scale, labels, weight, bias, counts),
                        {"features": mode, "metric": "cosine"}).head
    queries = torch.randn(30, 6, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(base.predict(queries), scaled.predict(queries * scale))


def test_every_head_reloads_with_identical_logits(toy_cache):
    lab_ = open_lab(toy_cache)
    generator = torch.Generator().manual_seed(0)  # a text head too, for the methods that need CLIP's
    lab_.data.text = LinearHead(torch.randn(3, lab_.data.train.features.shape[1], generator=generator) * 10,
                                normalize_input=True)
    cache = FeatureCache(toy_cache)
    for name in METHODS:
        overrides = {"min_steps": 30} if "min_steps" in METHODS[name].defaults else {}
        head = fit_method(name, lab_.data, overrides).head
        cache.save_head(name, head, {"fitted": name})
        reloaded, attrs = cache.load_head(name)
        assert type(reloaded) is type(head) and attrs == {"fitted": name}
        assert torch.equal(reloaded.logits(lab_.test.features), head.logits(lab_.test.features)), name


def test_crt_with_lbfgs_fits_full_batch(toy_cache):
    data = open_lab(toy_cache).data
    fitted = fit_method("crt", data, {"solver": "lbfgs", "lbfgs_steps": 50})
    assert fitted.chosen["solver"] == "lbfgs" and 0 < fitted.chosen["iterations"] <= 50
    train_accuracy = (fitted.head.predict(data.train.features) == data.train.labels).float().mean().item()
    assert train_accuracy > 0.9  # separable Gaussian blobs
    # the class-weighted objective at the end is below the one at a zero initialization (log 3 = 1.0986)
    assert fitted.chosen["final_loss"] < np.log(3)
