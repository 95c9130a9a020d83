"""The benchmark scripts stay runnable: each runs here on the CPU with tiny shapes (their numbers are not checked
here; they go to benchmarks/RESULTS.md from real runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_gpu_smoke_runs_on_cpu():
    out = run_script("benchmarks/gpu_smoke.py", "--device", "cpu", "--backbone", "resnet10", "--image-size", "32",
                     "--epochs", "1", "--workers", "0", "--torchrun", "2", "--grid-shape", "inat", "--grid-scale",
                     "0.02", "--grid-dim", "32")
    report = json.loads(out)
    grid = report["grid"]  # cRT and LWS grids of 1, 4 and 16 points, one pass against point by point
    assert [(row["method"], row["k"]) for row in grid["rows"]] == [(m, k) for m in ("crt", "lws") for k in (1, 4, 16)]
    assert all(row["difference"] < 1e-4 * max(1.0, row["scale"]) for row in grid["rows"])
    assert report["extract_rows"] == 1052  # synthetic-lt: 812 train (200 -> 20) + 80 val + 160 test
    assert report["train_images_per_second"] > 0 and report["stage2_seconds"] > 0
    assert set(report["test_all"]) == {"joint", "ncm", "crt", "tau_norm", "lws"}
    torchrun = report["torchrun"]  # the torchrun mode, here 2 gloo processes
    assert torchrun["processes"] == 2 and torchrun["extract_same_features"] is True
    assert set(torchrun["compare_test_all"]) == set(report["test_all"]) and torchrun["compare_max_difference"] <= 0.5


@pytest.mark.slow
def test_inat_shape_benchmark_runs_at_a_small_scale(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/inat_shape.py", "--scale", "0.02", "--dim", "64", "--results", results)
    for step in ("train logits if materialized", "open the cache", "NCM", "tau sweep", "logit adjustment",
                 "matrix-product floor", "one cRT epoch", "one LWS epoch", "`ltcache compare`", "extrapolated"):
        assert step in out, step
    assert "Stage 2 at iNaturalist 2018 shape" in results.read_text()


def test_tau_sweep_benchmark_runs(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/bench_tau_sweep.py", "--rows", "300", "--dim", "16", "--classes", "12",
                     "--repeats", "1", "--results", results)
    assert "full tau sweep (21 values)" in out
    assert results.read_text().startswith("# Benchmarks")


@pytest.mark.slow  # about 14 s and 5 s: CI runs it (.ci/run)
def test_stage2_benchmark_runs_at_a_small_shape(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/stage2.py", "--classes", "20", "--n-max", "200", "--imbalance", "20", "--dim", "32",
                     "--results", results)
    for step in ("open the cache", "tau sweep, 21 values", "cRT, 10 epochs", "LogisticRegression", "time to reach",
                 "per-sample HDF5 Dataset", "ltcache compare", "peak resident memory"):
        assert step in out
    assert results.read_text().count("| step |") == 1


@pytest.mark.slow  # about 14 s and 5 s: CI runs it (.ci/run)
def test_integrity_benchmark_runs_at_a_small_shape(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/integrity.py", "--classes", "12", "--n-max", "60", "--imbalance", "10", "--dim", "16",
                     "--repeats", "1", "--no-compare", "--results", results)
    for step in ("sha256 of every file", "open the lab without checks", "with every check", "ltcache sweep-tau"):
        assert step in out
    assert results.read_text().count("| step |") == 1


def test_grid_benchmark_runs_and_checks_heads_equal(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/grid.py", "--classes", "20", "--dim", "16", "--sizes", "1,4", "--results", results)
    text = results.read_text()
    assert "A grid in one pass against point by point" in text and text.count("| crt | ") == 2
    for line in (line for line in text.splitlines() if line.startswith(("| crt |", "| lws |"))):
        difference = float(line.split("|")[7].split()[0])
        assert difference < 1e-5, line  # the one pass and the points alone train the same heads
    assert "Command: `python benchmarks/grid.py --classes 20 --dim 16 --sizes 1,4`" in out


@pytest.mark.slow  # about 18 s: CI runs it (.ci/run)
def test_precision_benchmark_runs(tmp_path):
    from conftest import write_toy_cache

    cache = write_toy_cache(tmp_path / "c", class_counts=(40, 15, 6, 3), feature_dim=6, noise=1.2)
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/precision.py", "--classes", "10", "--dim", "16", "--caches", cache, "--seeds", "2",
               "--results", results)
    text = results.read_text()
    assert "float32 against bf16 products" in text and "| crt |" in text and "| mlp2 |" in text
    assert "Every method's bf16 mean inside its float32 seed interval on every cache:" in text


STAND_IN = """
# A stand-in with the official tau_norm.py's inputs and output format (four columns per tau: Many, Medium, Few,
# mean per class on test), written for this test: the harness is checked here, the real script on a real run.
import argparse, os, pickle
import numpy as np
import torch
parser = argparse.ArgumentParser()
parser.add_argument('--root')
root = parser.parse_args().root
train = pickle.load(open(os.path.join(root, 'trainfeat_all.pkl'), 'rb'))
test = pickle.load(open(os.path.join(root, 'testfeat_all.pkl'), 'rb'))
weight = torch.load(os.path.join(root, 'final_model_checkpoint.pth'))['state_dict_best']['classifier'][
    'module.fc.weight'].numpy()
counts = np.bincount(train['labels'])
for tau in np.linspace(0, 2, 21):
    norms = np.linalg.norm(weight, axis=1) ** tau
    predictions = (test['feats'] @ (weight / norms[:, None]).T).argmax(1)
    accuracy = np.array([(predictions[test['labels'] == c] == c).mean() for c in range(len(counts))]) * 100
    groups = [accuracy[counts > 100], accuracy[(counts <= 100) & (counts >= 20)], accuracy[counts < 20]]
    print(' \t '.join('{:.2f}'.format(g.mean() if len(g) else float('nan')) for g in groups + [accuracy]))
"""


@pytest.mark.slow  # about 9 s: CI runs it (.ci/run)
def test_official_tau_benchmark_skips_without_the_script_and_runs_with_one(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_script("benchmarks/tau_official.py", "--official", tmp_path / "nowhere", "--classes", "30", "--dim",
                     "16", "--results", results)
    assert out.startswith("skipped:") and "holds no tau_norm.py" in out and not results.exists()
    official = tmp_path / "official"
    official.mkdir()
    (official / "tau_norm.py").write_text(STAND_IN)
    (official / "utils.py").write_text("")
    run_script("benchmarks/tau_official.py", "--official", official, "--classes", "30", "--dim", "16", "--rounds",
               "1", "--results", results)
    text = results.read_text()
    assert "ltcache sweep-tau against the official tau_norm.py" in text
    float32 = next(line for line in text.splitlines() if line.startswith("ltcache sweep-tau (float32): chosen tau"))
    assert float32.endswith("(the same).")  # ltcache's test row equals the stand-in's line at the chosen tau
    assert "ltcache sweep-tau --precision bf16: chosen tau" in text
