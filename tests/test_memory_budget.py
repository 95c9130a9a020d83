"""Stage 2 under a memory budget: logits beyond it are computed in row blocks (or per batch), never held whole,
and every method gives what it gives with the logits held whole; float16 caches stay float16 in memory."""

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke, write_toy_cache
from ltcache.heads import Head
from ltcache.lab import open_lab
from ltcache.logits import BlockLogits, parse_size
from ltcache.stage2 import METHODS as REGISTRY
from ltcache.stage2 import method_names

COUNTS = [int(300 * 0.75**i) for i in range(16)]  # 300 .. 4 train images per class
METHODS = ["joint", "ncm", "crt", "tau_norm", "lws", "logit_adj", "tau_learned", "disalign"]
EXACT = ["joint", "ncm", "crt", "tau_norm", "logit_adj"]  # their fits never train on the logits
TINY = 4096  # bytes: every logit matrix here is larger, so each is read in 1024-row blocks


@pytest.fixture(scope="module")
def lt_cache(tmp_path_factory):
    return write_toy_cache(tmp_path_factory.mktemp("budget") / "c", class_counts=COUNTS, feature_dim=16,
                           shard_rows=256, noise=1.5)  # overlapping classes: accuracies well below 100


def _compare(cache, budget, monkeypatch=None):
    lab = open_lab(cache, memory_budget=budget)
    rows_seen = []
    if monkeypatch is not None:
        original = Head.logits

        def logits(self, features):
            rows_seen.append(len(features))
            return original(self, features)

        monkeypatch.setattr(Head, "logits", logits)
    comparison = lab.compare(METHODS, bootstrap=0)
    return lab, comparison, rows_seen


def test_blocked_logits_give_the_same_results_and_no_full_train_matrix(lt_cache, monkeypatch):
    whole_lab, whole, whole_rows = _compare(lt_cache, None, monkeypatch)
    monkeypatch.undo()
    lab, blocked, blocked_rows = _compare(lt_cache, TINY, monkeypatch)
    monkeypatch.undo()
    train_rows = len(lab.data.train)
    assert train_rows == sum(COUNTS) > 1024
    assert isinstance(lab.data.raw_logits("train"), BlockLogits)
    assert not isinstance(whole_lab.data.raw_logits("train"), BlockLogits)
    # Held whole, the train logits are one [N, C] product; under the budget no call ever covers all train rows.
    assert train_rows in whole_rows
    assert train_rows not in blocked_rows and max(blocked_rows) <= 1024
    for name in METHODS:
        a, b = whole.row(name).evaluation, blocked.row(name).evaluation
        if name in EXACT:
            assert a.accuracy == b.accuracy, name
            assert a.calibration.ece == pytest.approx(b.calibration.ece, abs=1e-6), name
            assert a.temperature == pytest.approx(b.temperature, rel=1e-4), name
        else:  # trained on per-batch logits instead of rows of one product: float rounding apart
            assert abs(a.mean_per_class - b.mean_per_class) <= 0.5, (name, a.mean_per_class, b.mean_per_class)
    assert whole.curves["tau_curve"].entries == blocked.curves["tau_curve"].entries
    assert 40 < whole.row("tau_norm").evaluation.mean_per_class < 90  # a test that can tell methods apart


@pytest.fixture(scope="module")
def long_splits(tmp_path_factory):
    """Train, val and test each longer than one 1024-row block and not a multiple of it (2,010, 1,280 and 1,280
    rows), with a text head so that every method runs."""
    return write_toy_cache(tmp_path_factory.mktemp("blocks") / "c", class_counts=COUNTS, feature_dim=16,
                           shard_rows=256, noise=1.5, val_per_class=80, test_per_class=80, text_head=True)


@pytest.mark.parametrize("select", ["val", "train"])
def test_every_method_scores_when_every_split_spans_several_blocks(long_splits, select):
    """Scoring, calibration and the temperature read labels at a running offset beside blocks of logits: a split of
    more than one block whose length is not a multiple of the chunk once crashed (labels.split fell out of step)."""
    names = method_names()
    quick = {name: {key: value for key, value in (("epochs", 1), ("min_steps", 30)) if key in REGISTRY[name].defaults}
             for name in names if REGISTRY[name].stochastic}
    whole = open_lab(long_splits, select=select).compare(names, params=quick, bootstrap=0)
    lab = open_lab(long_splits, select=select, memory_budget=TINY)
    assert all(len(split) > 1024 and len(split) % 1024 for split in (lab.data.train, lab.data.val, lab.test))
    blocked = lab.compare(names, params=quick, bootstrap=0)
    assert [row.method for row in blocked.rows] == names
    for name in names:
        a, b = whole.row(name).evaluation, blocked.row(name).evaluation
        if not REGISTRY[name].stochastic:
            assert a.accuracy == b.accuracy, name
            assert a.temperature == pytest.approx(b.temperature, rel=1e-4), name
            assert a.calibrated.ece == pytest.approx(b.calibrated.ece, abs=1e-4), name
        else:
            assert abs(a.mean_per_class - b.mean_per_class) <= 1.0, (name, a.mean_per_class, b.mean_per_class)


def test_float16_cache_stays_half_in_memory_and_scores_like_float32(tmp_path, lt_cache):
    half = write_toy_cache(tmp_path / "half", class_counts=COUNTS, feature_dim=16, shard_rows=256, dtype="float16",
                           noise=1.5)
    lab = open_lab(half)
    assert lab.data.train.features.dtype == torch.float16 and lab.test.features.dtype == torch.float16
    full = open_lab(lt_cache)
    assert torch.allclose(lab.data.train.features.float(), full.data.train.features, atol=1e-2)
    comparison = lab.compare(METHODS, bootstrap=0)
    reference = full.compare(METHODS, bootstrap=0)
    for name in METHODS:
        difference = abs(comparison.row(name).evaluation.mean_per_class
                         - reference.row(name).evaluation.mean_per_class)
        assert difference <= 1.0, (name, difference)
    # and under a budget too: float16 blocks are upcast on their way in
    blocked = open_lab(half, memory_budget=TINY).compare(["lws", "crt"], bootstrap=0)
    assert blocked.row("crt").evaluation.accuracy == comparison.row("crt").evaluation.accuracy


@pytest.mark.parametrize("text, expected", [("4K", 4096), ("2G", 2 << 30), ("1.5M", 3 << 19), ("512MiB", 512 << 20),
                                            ("4096", 4096), (8192, 8192)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


def test_cli_memory_budget(tmp_path, lt_cache):
    result = invoke("compare", lt_cache, "--methods", "joint,lws", "--bootstrap", "0", "--memory-budget", "4K",
                    "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    for bad in ("lots", "12Q", "0", "100"):
        result = invoke("sweep-tau", lt_cache, "--memory-budget", bad)
        assert_clean_error(result, "--memory-budget", "e.g. 512M")
    assert np.isfinite(parse_size("1K"))
