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
                     "--epochs", "1", "--workers", "0", "--torchrun", "2")
    report = json.loads(out)
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
