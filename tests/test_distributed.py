"""Stage 1 under torchrun: two CPU processes (gloo) train one model; only rank 0 writes."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ltcache.stage1.checkpoint import load_checkpoint

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch build has no gloo backend"),
              pytest.mark.slow]  # two-process runs of train, extract and every method: CI runs them (.ci/run)


def test_torchrun_two_processes_train_and_write_once(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ltcache", "train-backbone",
               "--out", str(out), "--epochs", "2", "--batch-size", "32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checkpoint:") == 1
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and not any(key.startswith("module.") for key in state["model"])


def test_torchrun_extraction_equals_one_process(digits_run, tmp_path):
    """Two gloo processes each extract whole shards (a contiguous run of them), gathering no features; rank 0
    writes the manifest. The cache reads back the same rows per sample index as a single process's."""
    from ltcache.cache import FeatureCache

    checkpoint = digits_run["run"] / "checkpoint.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ltcache", "extract", str(checkpoint), "--out", str(tmp_path / "two"), "--shard-rows", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cache:") == 1
    one, two = FeatureCache(digits_run["cache"]), FeatureCache(tmp_path / "two")
    shards = [shard["file"] for shard in two.manifest["splits"]["train"]["shards"]]
    rows = two.manifest["splits"]["train"]["rows"]
    assert shards == [f"train/{k:05d}.h5" for k in range(-(-rows // 64))]  # shard k: indices 64k.., any N
    assert two.manifest["class_counts"] == one.manifest["class_counts"]
    assert not list(tmp_path.glob(".two.staging-*"))  # the staging folder became the cache
    for split in ("train", "val", "test"):
        a, b = one.load_split(split), two.load_split(split)
        assert torch.equal(a.labels, b.labels), split
        assert torch.allclose(a.features, b.features, atol=1e-5), split
    weight_one, bias_one = one.joint_head()
    weight_two, bias_two = two.joint_head()
    assert torch.equal(weight_one, weight_two) and torch.equal(bias_one, bias_two)
    views = [*command[:command.index("--out")], "--out", str(tmp_path / "views"), "--train-views", "2"]
    refused = subprocess.run(views, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not supported under torchrun or with --resume yet" in refused.stderr
    assert not (tmp_path / "views").exists()


def test_torchrun_compare_equals_one_process(digits_run, tmp_path):
    """Stage 2 under torchrun: two gloo processes draw the same batches, each computes its own rows, gradients are
    summed; scoring splits test and val across them. Every method (--methods all: the trained ones included, whose
    losses may be weighted means such as DisAlign's) must fit the same head as one process, to float rounding, and
    rank 0 alone writes the same report format."""
    from ltcache.cache import FeatureCache
    from ltcache.stage2 import METHODS

    cache = digits_run["cache"]
    args = ["compare", str(cache), "--methods", "all", "--bootstrap", "0", "--json"]
    one = subprocess.run([sys.executable, "-m", "ltcache", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ltcache", *args, "--out", str(tmp_path / "two")]
    two = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: rank 0 alone prints
    assert single["provenance"]["processes"] == 1 and double["provenance"]["processes"] == 2
    names = [r["method"] for r in single["rows"]]
    assert names == [r["method"] for r in double["rows"]]
    trained = {name for name in names if METHODS[name].stochastic}
    assert trained >= {"crt", "lws", "crt_bsm", "crt_las", "crt_maxnorm", "cos", "cos_la", "tau_learned", "disalign",
                       "mlp2", "mlp3"}
    stored = FeatureCache(cache)
    test = stored.load_split("test").features
    differences = {}
    for a, b in zip(single["rows"], double["rows"], strict=True):
        name = a["method"]
        assert set(a) == set(b), name
        # The same head: every step was the single-process step, up to the order of float sums (3e-7 of the largest
        # logit for the linear heads when written), which the non-convex MLPs amplify over 500 steps (0.6%).
        first = stored.load_head(name, folder=tmp_path / "one" / "heads")[0].logits(test)
        second = stored.load_head(name, folder=tmp_path / "two" / "heads")[0].logits(test)
        relative = ((first - second).abs().max() / first.abs().max()).item()
        differences[name] = relative
    apart = {name: value for name, value in differences.items() if value > (2e-2 if name.startswith("mlp") else 1e-4)}
    assert not apart, apart
    for a, b in zip(single["rows"], double["rows"], strict=True):
        name = a["method"]
        for key in ("all", "mean_per_class", "many", "medium", "few"):
            if name not in trained:
                assert a[key] == b[key], (name, key)
            else:
                assert abs(a[key] - b[key]) <= 0.5, (name, key, a[key], b[key])
        tolerance = 1e-2 if name in trained else 1e-4
        assert abs(a["temperature"] - b["temperature"]) <= tolerance * a["temperature"], name
    files = {p.name for p in (tmp_path / "one" / "reports").iterdir()}
    assert files == {p.name for p in (tmp_path / "two" / "reports").iterdir()} and "results.json" in files
    assert sorted(p.name for p in (tmp_path / "two" / "heads").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "heads").iterdir())
