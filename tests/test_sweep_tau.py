"""ltcache sweep-tau reads only what it uses (issue 23): the manifest, the joint head, the selection split and test,
each file hashed and checked as it is read, never train with --select val; on the CPU in float32 it runs on numpy
alone (no torch import), and its numbers are compare's tau_norm's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, checksum, run_ltcache, write_toy_cache
from ltcache import open_lab
from ltcache.lab import sweep_tau

COUNTS = [int(200 * 0.7**i) for i in range(10)]  # 200 .. 8 train images per class


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_toy_cache(tmp_path_factory.mktemp("sweep") / "c", class_counts=COUNTS, feature_dim=12,
                           shard_rows=128, noise=1.6)  # overlapping classes: the curve is not flat


def test_sweep_equals_compare_tau_norm(cache):
    """The numpy sweep and the lab's tau_norm (torch products, the grid scored on cached logits) agree: the same
    curve, the same tau, the same test row."""
    for select in ("val", "train"):
        swept = sweep_tau(cache, select=select, device="cpu")
        lab = open_lab(cache, select=select, device="cpu")
        fitted = lab.fit("tau_norm")
        assert swept.best_tau == fitted.chosen["tau"]
        assert [entry["tau"] for entry in swept.curve] == [entry["tau"] for entry in fitted.curve]
        for ours, theirs in zip(swept.curve, fitted.curve, strict=True):
            assert ours == pytest.approx(theirs, abs=1e-9)
        assert swept.test.as_dict() == pytest.approx(lab.score_accuracy(fitted.head).as_dict(), abs=1e-9, nan_ok=True)
    curve = [entry["mean_per_class"] for entry in swept.curve]
    assert max(curve) > min(curve) + 1  # a curve that could have chosen otherwise


def test_bf16_products_choose_as_float32_on_a_toy_cache(cache):
    exact, rounded = sweep_tau(cache, device="cpu"), sweep_tau(cache, device="cpu", precision="bf16")
    assert rounded.best_tau == exact.best_tau
    assert abs(rounded.test.mean_per_class - exact.test.mean_per_class) < 1.0  # bf16 keeps 8 bits of mantissa


def test_select_val_never_reads_train_and_every_read_file_is_checked(cache, tmp_path):
    """A damaged train shard does not stop sweep-tau --select val (train is not read), stops --select train with
    the sha256 error, and a damaged test shard stops both; nothing in the cache is written."""
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    train_shard = copy / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(train_shard.read_bytes())
    data[-9] ^= 0xFF
    train_shard.write_bytes(bytes(data))
    before = checksum(copy)
    ok = run_ltcache(["sweep-tau", copy, "--json", "--device", "cpu"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["selected_on"] == "val"
    assert checksum(copy) == before
    refused = run_ltcache(["sweep-tau", copy, "--select", "train", "--device", "cpu"], cwd=tmp_path)
    assert_one_line_error(refused, ["sha256"])
    test_shard = copy / manifest["splits"]["test"]["shards"][0]["file"]
    data = bytearray(test_shard.read_bytes())
    data[-9] ^= 0xFF
    test_shard.write_bytes(bytes(data))
    before = checksum(copy)
    refused = run_ltcache(["sweep-tau", copy, "--device", "cpu"], cwd=tmp_path)
    assert_one_line_error(refused, ["sha256"])
    assert checksum(copy) == before


def test_sweep_on_the_cpu_imports_no_torch(cache, tmp_path):
    """On the CPU in float32 the sweep needs numpy alone: torch, the largest start-up cost, is never imported."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, file=sys.stderr))\n"
              "sys.argv = ['ltcache', 'sweep-tau', sys.argv[1], '--json', '--device', 'cpu']\n"
              "from ltcache.cli import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", script, str(cache)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stderr
    assert json.loads(done.stdout)["best_tau"] == sweep_tau(cache, device="cpu").best_tau
