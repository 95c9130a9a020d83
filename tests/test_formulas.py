"""Hand-computed small cases for every formula of the paper that ltcache implements."""

import math

import numpy as np
import pytest
import torch

from conftest import lab_data
from ltcache.core.runtime import cosine_schedule
from ltcache.data.profiles import exponential_profile
from ltcache.data.samplers import class_probabilities, progressive_probabilities, sample_weights
from ltcache.metrics import ShotThresholds, evaluate, shot_groups
from ltcache.stage2 import LinearHead, fit_method
from ltcache.stage2.methods.ncm import class_means
from ltcache.stage2.methods.weight_norms import tau_curve, tau_normalize

COUNTS = [9, 4, 1]


def test_eq1_instance_balanced_is_proportional_to_counts():
    np.testing.assert_allclose(class_probabilities(COUNTS, 1.0), [9 / 14, 4 / 14, 1 / 14])


def test_eq1_class_balanced_is_uniform():
    np.testing.assert_allclose(class_probabilities(COUNTS, 0.0), [1 / 3, 1 / 3, 1 / 3])


def test_eq1_square_root():
    # sqrt counts 3, 2, 1 -> sum 6
    np.testing.assert_allclose(class_probabilities(COUNTS, 0.5), [3 / 6, 2 / 6, 1 / 6])


def test_eq2_first_epoch_is_instance_balanced_and_last_is_mostly_class_balanced():
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 0, 10), [9 / 14, 4 / 14, 1 / 14])
    # t = 9 of T = 10: 0.1 * p_IB + 0.9 * p_CB
    expected = [0.1 * 9 / 14 + 0.3, 0.1 * 4 / 14 + 0.3, 0.1 * 1 / 14 + 0.3]
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 9, 10), expected)


def test_sample_weights_give_class_probabilities():
    labels = np.array([0] * 9 + [1] * 4 + [2])
    weights = sample_weights(labels, class_probabilities(COUNTS, 0.0))
    per_class = np.bincount(labels, weights=weights)
    np.testing.assert_allclose(per_class, [1 / 3, 1 / 3, 1 / 3])


def test_long_tail_profile_matches_formula_and_exact_endpoints():
    # floor(1280 * 256^(-i/9)) evaluated with 50-digit decimals; sums to 2773 train images
    assert exponential_profile(10, 1280, 256) == [1280, 691, 373, 201, 108, 58, 31, 17, 9, 5]
    assert exponential_profile(3, 100, 4) == [100, 50, 25]


def test_shot_groups_at_threshold_edges():
    groups = shot_groups([101, 100, 20, 19, 150, 5])
    assert list(groups) == ["many", "medium", "medium", "few", "many", "few"]
    custom = shot_groups([10, 5, 4], ShotThresholds(many=5, few=5))
    assert list(custom) == ["many", "medium", "few"]


def test_evaluate_groups_are_means_of_per_class_accuracy():
    class_counts = [200, 50, 10]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])
    result = evaluate(predictions, labels, class_counts)
    assert result["many"] == pytest.approx(75.0)
    assert result["medium"] == pytest.approx(50.0)
    assert result["few"] == pytest.approx(0.0)
    assert result["all"] == pytest.approx(100 * 4 / 8)
    assert result["mean_per_class"] == pytest.approx((75 + 50 + 0) / 3)
    assert (result["n_many"], result["n_medium"], result["n_few"]) == (1, 1, 1)


def test_cosine_schedule_starts_at_peak_and_ends_at_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = cosine_schedule(optimizer, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    np.testing.assert_allclose(seen, expected)
    assert seen[0] == pytest.approx(0.2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _lab(weight, bias, features, labels, class_counts, select="val"):
    return lab_data(weight, bias, features, labels, class_counts, select=select)


def test_tau_zero_equals_joint_without_bias_and_tau_one_gives_unit_rows():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(tau_normalize(weight, 0.0), weight)
    unit = tau_normalize(weight, 1.0)
    np.testing.assert_allclose(unit.norm(dim=1).numpy(), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(unit.numpy(), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    half = tau_normalize(weight, 0.5)  # norms 5 and 2 -> divide by sqrt(5), sqrt(2)
    np.testing.assert_allclose(half.numpy(), [[3 / 5**0.5, 4 / 5**0.5], [0, 2 / 2**0.5]], rtol=1e-6)


def test_tau_sweep_fast_path_matches_explicit_tau_normalized_heads():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    weight = torch.randn(4, 6, generator=generator) * torch.tensor([4.0, 2.0, 1.0, 0.3])[:, None]
    data = _lab(weight, torch.randn(4), features, labels, [150, 60, 20, 5])
    taus = [0.0, 0.3, 1.0, 1.7]
    curve = tau_curve(data, "val", taus)
    for tau, entry in zip(taus, curve, strict=True):
        explicit = data.score(LinearHead(tau_normalize(weight, tau)).predict(features), "val")
        assert entry["tau"] == tau
        assert entry["mean_per_class"] == pytest.approx(explicit["mean_per_class"])
        assert entry["few"] == pytest.approx(explicit["few"])


@pytest.mark.parametrize("threads", [1, 2])
def test_affine_argmax_matches_torch_bit_for_bit(threads):
    """The chunked, threaded numpy sweep equals torch's mul / add / argmax on every row and grid point."""
    from ltcache.stage2.methods.weight_norms import affine_argmax

    generator = torch.Generator().manual_seed(1)
    raw = torch.randn(1300, 37, generator=generator)  # several chunks per thread, a ragged last chunk
    scales, shifts = torch.rand(5, 37, generator=generator) + 0.5, torch.randn(5, 37, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s, o in ((scales, None), (None, shifts), (scales, shifts)):
            expected = torch.stack([((raw * s[p]) if s is not None else raw).add(o[p] if o is not None else 0)
                                    .argmax(1) for p in range(5)])
            assert torch.equal(affine_argmax(raw, s, o), expected)
    finally:
        torch.set_num_threads(previous)


def test_tau_norm_picks_the_tau_that_fixes_a_norm_bias():
    # Class 0 has a huge weight norm and steals every class-1 sample at tau = 0; tau = 1 fixes it.
    weight = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.2], [0.9, -0.1], [0.3, 1.0], [0.2, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    data = _lab(weight, torch.zeros(2), features, labels, [500, 5])
    fitted = fit_method("tau_norm", data, {"taus": (0.0, 1.0)})
    assert fitted.chosen["tau"] == 1.0
    assert [entry["mean_per_class"] for entry in fitted.curve] == [50.0, 100.0]


def test_joint_method_keeps_the_bias():
    weight, bias = torch.eye(2), torch.tensor([0.0, 5.0])
    data = _lab(weight, bias, torch.eye(2), torch.tensor([0, 1]), [150, 5])
    fitted = fit_method("joint", data)
    assert torch.equal(fitted.head.bias, bias)
    assert fitted.head.predict(torch.eye(2)).tolist() == [1, 1]


def test_lws_with_unit_scales_equals_joint_without_bias_and_learns_to_rebalance():
    from ltcache.stage2.modules import ScaleLogits

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(50, 3, generator=generator)
    weight = torch.randn(4, 3, generator=generator)
    unit = ScaleLogits(4, "cpu")
    np.testing.assert_allclose(unit(features @ weight.T).detach().numpy(), (features @ weight.T).numpy(), rtol=1e-6)

    # Two classes along orthogonal axes; the joint W over-weights class 0 by 10x.
    labels = torch.tensor([0] * 40 + [1] * 4)
    features = torch.cat([torch.tensor([[1.0, 0.3]]).repeat(40, 1), torch.tensor([[0.3, 1.0]]).repeat(4, 1)])
    data = _lab(torch.tensor([[10.0, 0.0], [0.0, 1.0]]), torch.zeros(2), features, labels, [40, 4])
    fitted = fit_method("lws", data, {"epochs": 2, "min_steps": 200, "batch_size": 32})
    scales = fitted.head.weight.norm(dim=1) / torch.tensor([10.0, 1.0])
    assert scales[1] / scales[0] > 3.3  # the tail class must be up-weighted enough to win its own samples
    assert fitted.head.bias is None
    assert fitted.head.predict(features).tolist() == labels.tolist()


def test_ncm_on_separable_toy_data():
    features = torch.tensor([[2.0, 0.1], [4.0, -0.1], [0.1, 1.0], [-0.1, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    means = class_means(features, labels, 2)
    np.testing.assert_allclose(means.numpy(), [[3.0, 0.0], [0.0, 2.0]], atol=1e-6)
    data = _lab(torch.eye(2) * torch.tensor([[100.0], [0.01]]), torch.zeros(2), features, labels, [150, 5])
    for metric in ("cosine", "euclidean"):
        head = fit_method("ncm", data, {"metric": metric}).head
        assert head.normalize_input
        queries = torch.tensor([[5.0, 0.5], [0.5, 5.0], [0.01, 0.02]])  # scale does not matter after L2-norm
        assert head.predict(queries).tolist() == [0, 1, 1]


def test_crt_balances_a_tail_class_the_joint_head_ignores():
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 200 + [1] * 5)
    features = torch.randn(205, 2, generator=generator) * 0.3 + torch.where(labels[:, None] == 0,
                                                                           torch.tensor([1.0, 0.0]),
                                                                           torch.tensor([0.0, 1.0]))
    data = _lab(torch.tensor([[1.0, 0.0], [0.0, 0.1]]), torch.tensor([5.0, 0.0]), features, labels, [200, 5])
    joint_recall = (fit_method("joint", data).head.predict(features)[labels == 1] == 1).float().mean()
    crt = fit_method("crt", data, {"epochs": 2, "min_steps": 300, "batch_size": 64})
    crt_recall = (crt.head.predict(features)[labels == 1] == 1).float().mean()
    assert joint_recall == 0.0
    assert crt_recall == 1.0
    assert crt.chosen["steps"] == 300


def test_scaled_cross_entropy_matches_autograd():
    from ltcache.stage2.modules import ScaledCrossEntropy

    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(64, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 7, (64,), generator=generator)
    scales = (torch.rand(7, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    reference = torch.nn.functional.cross_entropy(raw * scales, labels)
    (expected,) = torch.autograd.grad(reference, scales)
    loss = ScaledCrossEntropy.apply(raw, scales, labels)
    (got,) = torch.autograd.grad(3.0 * loss, scales)  # an upstream gradient is carried through
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(got, 3.0 * expected)
    assert torch.autograd.gradcheck(lambda s: ScaledCrossEntropy.apply(raw, s, labels), (scales,))
