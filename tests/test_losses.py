"""Hand-computed values for every stage-1 loss, DRW switching, and the official class-aware sampler."""

import math

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke
from ltcache.core.errors import LtcacheError
from ltcache.data.samplers import EpochSampler, SamplerName
from ltcache.stage1.losses import build_loss, class_balanced_weights

ZERO = torch.zeros(1, 2)


def test_cross_entropy():
    loss = build_loss("ce", [5, 5])(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_class_balanced_weights_effective_number():
    # beta 0.9: effective numbers 1 - 0.9^10 = 0.651322 and 0.1; w ∝ 0.1/E, normalized to sum to 2
    raw = np.array([0.1 / (1 - 0.9**10), 1.0])
    np.testing.assert_allclose(class_balanced_weights([10, 1], 0.9).numpy(), 2 * raw / raw.sum(), rtol=1e-6)
    assert class_balanced_weights([10, 1], 0.9).numpy() == pytest.approx([0.266197, 1.733803], abs=1e-5)


def test_cb_ce_weights_the_batch_mean():
    weights = class_balanced_weights([10, 1], 0.9)
    logits, targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    per_sample = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))])
    expected = (weights * per_sample).sum() / weights.sum()
    assert build_loss("cb_ce", [10, 1], {"beta": 0.9})(logits, targets).item() == pytest.approx(expected.item())


def test_focal_loss():
    # p_t = 0.5: (1 - 0.5)^2 * log 2
    assert build_loss("focal", [5, 5], {"gamma": 2.0})(ZERO, torch.tensor([0])).item() == \
        pytest.approx(0.25 * math.log(2))
    # gamma = 0 is CE
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    targets = torch.tensor([1, 0])
    assert build_loss("focal", [5, 5], {"gamma": 0.0})(logits, targets).item() == \
        pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def test_cb_focal_weights_each_sample():
    logits, targets = torch.zeros(2, 2), torch.tensor([0, 1])
    weights = class_balanced_weights([10, 1], 0.9)
    each = 0.25 * math.log(2)  # both samples have p_t = 0.5
    expected = (weights * each).sum() / weights.sum()
    assert build_loss("cb_focal", [10, 1], {"gamma": 2.0, "beta": 0.9})(logits, targets).item() == \
        pytest.approx(expected.item())


def test_ldam_margins_and_value():
    loss = build_loss("ldam", [16, 1])
    # n^-1/4 = 0.5 and 1, scaled so the largest margin is 0.5
    np.testing.assert_allclose(loss.margins.numpy(), [0.25, 0.5])
    # target 1 with zero logits: logits become (0, -0.5); CE = log(1 + e^0.5)
    assert loss(ZERO, torch.tensor([1])).item() == pytest.approx(math.log(1 + math.exp(0.5)))
    scaled = build_loss("ldam", [16, 1], {"s": 30.0})
    assert scaled(ZERO, torch.tensor([1])).item() == pytest.approx(math.log(1 + math.exp(15)))


def test_logit_adjusted_and_balanced_softmax():
    # prior (0.75, 0.25): CE over (log 0.75, log 0.25) for target 1 is log 4
    for name in ("logit_adjusted", "balanced_softmax"):
        assert build_loss(name, [3, 1])(ZERO, torch.tensor([1])).item() == pytest.approx(math.log(4))
    half = build_loss("logit_adjusted", [3, 1], {"tau": 0.5})(ZERO, torch.tensor([1]))
    assert half.item() == pytest.approx(-math.log(0.5 / (math.sqrt(0.75) + 0.5)))
    with pytest.raises(LtcacheError, match="balanced_softmax is logit adjustment with tau = 1"):
        build_loss("balanced_softmax", [3, 1], {"tau": 2.0})


def test_drw_switches_weights_on_at_its_epoch():
    loss = build_loss("ldam", [100, 1], {"drw_epoch": 2})
    logits, targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    loss.set_epoch(0)
    before = loss(logits, targets).item()
    loss.set_epoch(1)
    assert loss(logits, targets).item() == before
    loss.set_epoch(2)
    after = loss(logits, targets).item()
    weights = class_balanced_weights([100, 1], 0.9999)
    per_sample = torch.nn.functional.cross_entropy(logits - torch.tensor([[0.5 / 100**0.25 / 1, 0], [0, 0.5]]),
                                                   targets, reduction="none")
    assert after == pytest.approx(((weights * per_sample).sum() / weights.sum()).item(), rel=1e-5)
    assert after > before  # the tail sample, which has the larger loss, now weighs more


def test_unknown_loss_and_parameter():
    with pytest.raises(LtcacheError, match="unknown loss 'dice'"):
        build_loss("dice", [1, 1])
    with pytest.raises(LtcacheError, match="loss focal has no parameter 'beta'"):
        build_loss("focal", [1, 1], {"beta": 0.9})


def test_class_aware_sampler_takes_runs_of_one_class_and_balances_classes():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    sampler = EpochSampler(labels, SamplerName.class_aware, total_epochs=1, seed=0, samples_per_class=4)
    drawn = np.array(list(sampler))
    assert len(drawn) == 100
    runs = labels[drawn].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # 4 consecutive images of one class per visit
    counts = np.bincount(labels[drawn], minlength=3)
    assert counts.max() - counts.min() <= 8  # classes visited in shuffled cycles: within two visits
    tail = drawn[labels[drawn] == 2]
    assert set(tail) == set(range(90, 100))  # the tail class cycles through all its images


def test_cli_trains_with_ldam_drw_and_the_class_aware_sampler(tmp_path):
    import json

    out = tmp_path / "run"
    result = invoke("train-backbone", "--out", out, "--epochs", "2", "--batch-size", "32", "--loss", "ldam",
                    "--loss-param", "drw_epoch=1", "--sampler", "class-aware")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["loss"] == "ldam" and config["loss_params"] == {"drw_epoch": 1}
    assert config["sampler"] == "class-aware" and config["lr_rule"] == "0.2 x batch_size / 512"
    bad = invoke("train-backbone", "--out", tmp_path / "r2", "--loss", "focal", "--loss-param", "beta=0.9")
    assert_clean_error(bad, "loss focal has no parameter 'beta'")
    assert not (tmp_path / "r2").exists()
