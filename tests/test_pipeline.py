"""The real pipeline on digits-LT, end to end through the CLI (the README's `ltcache demo`)."""

import json

import h5py
import numpy as np
import torch

from conftest import assert_clean_error, invoke
from ltcache.cache import FeatureCache
from ltcache.data import DatasetSpec, build_dataset

DECOUPLED = ("ncm", "crt", "tau_norm", "lws")


def rows_by_method(summary):
    return {row["method"]: row for row in summary["rows"]}


def test_demo_decoupled_classifiers_beat_joint_on_few(digits_run):
    rows = rows_by_method(digits_run["summary"])
    assert set(rows) == {"joint", *DECOUPLED}
    # Margins from 5 seeds of this recipe: every decoupled method beat joint on Few by >= 2.5 points.
    for method in DECOUPLED:
        assert rows[method]["few"] > rows["joint"]["few"] + 1.0, (method, rows[method]["few"], rows["joint"]["few"])
    best = max(rows[m]["mean_per_class"] for m in DECOUPLED)
    assert best > rows["joint"]["mean_per_class"] + 2.0
    assert rows["tau_norm"]["chosen"]["selected_on"] == "val"
    assert "| joint |" in digits_run["output"] and "tau_curve.png" in digits_run["output"]


def test_demo_writes_run_folder_cache_heads_and_reports(digits_run):
    run, cache = digits_run["run"], digits_run["cache"]
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["backbone"] == "smallresnet8"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == config["config"]["epochs"]
    assert epochs[0]["lr"] == config["config"]["lr"]  # the first epoch starts at the peak
    assert set(epochs[0]) >= {"epoch", "loss", "lr", "val_top1"}
    assert FeatureCache(cache).head_names() == sorted(["joint", *DECOUPLED])
    for name in ("weight_norms.png", "tau_curve.png"):
        assert (cache / "reports" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (cache / "reports" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,many,medium,few,all") and len(csv_lines) == 6


def test_manifest_matches_the_dataset(digits_run):
    manifest = json.loads((digits_run["cache"] / "manifest.json").read_text())
    data = build_dataset(DatasetSpec("digits-lt"))
    assert manifest["class_counts"] == data.class_counts == [114, 73, 47, 30, 20, 12, 8, 5, 3, 2]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 314, "val": 200, "test": 400}
    assert manifest["dataset"]["seed"] == 0 and manifest["dataset"]["imbalance_factor"] == 50.0
    assert len(manifest["backbone"]["checkpoint_sha256"]) == 64
    with h5py.File(digits_run["cache"] / "head.h5") as f:
        assert f["weight"].shape == (10, 64)


def test_membership_traces_every_row_to_its_source_image(digits_run):
    from sklearn.datasets import load_digits

    cache = FeatureCache(digits_run["cache"])
    target = load_digits().target
    for split in ("train", "val", "test"):
        positions = cache.membership(split)
        labels = cache.load_split(split).labels.numpy()
        np.testing.assert_array_equal(target[positions], labels)
    every = np.concatenate([cache.membership(s) for s in ("train", "val", "test")])
    assert len(np.unique(every)) == len(every) == 914  # the three splits are disjoint


def test_sweep_tau_json_and_select_on_train(digits_cache_copy):
    result = invoke("sweep-tau", digits_cache_copy, "--json", "--taus", "0:1.5:0.5")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [entry["tau"] for entry in payload["curve"]] == [0.0, 0.5, 1.0, 1.5]
    assert payload["best_tau"] in (0.0, 0.5, 1.0, 1.5) and payload["selected_on"] == "val"
    assert payload["best_score"] == max(entry["mean_per_class"] for entry in payload["curve"])
    table = invoke("sweep-tau", digits_cache_copy, "--select", "train")
    assert table.exit_code == 0 and "tau sweep on train" in table.stdout and "test, scored once" in table.stdout


def test_compare_subset_with_overrides_and_info(digits_cache_copy):
    result = invoke("compare", digits_cache_copy, "--methods", "joint,ncm", "--set", "ncm.metric=euclidean",
                    "--json")
    assert result.exit_code == 0, result.output
    rows = rows_by_method(json.loads(result.stdout))
    assert set(rows) == {"joint", "ncm"} and rows["ncm"]["chosen"] == {"metric": "euclidean", "features": "cl2n"}
    info = invoke("info", digits_cache_copy, "--json", "--verify")
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    assert summary["groups"] == {"many": 1, "medium": 4, "few": 5}
    assert summary["corrupt_files"] == [] and summary["problems"] == [] and summary["splits"]["test"] == 400


def test_extract_refuses_existing_cache_and_float16_overwrite_matches(digits_run, digits_cache_copy):
    checkpoint = digits_run["run"] / "checkpoint.pt"
    before = (digits_cache_copy / "manifest.json").read_text()
    refused = invoke("extract", checkpoint, "--out", digits_cache_copy)
    assert refused.exit_code == 2 and "already exists" in refused.stderr
    assert (digits_cache_copy / "manifest.json").read_text() == before
    again = invoke("extract", checkpoint, "--out", digits_cache_copy, "--dtype", "float16", "--overwrite",
                   "--shard-rows", "100")
    assert again.exit_code == 0, again.output
    fresh = FeatureCache(digits_cache_copy)
    assert fresh.manifest["dtype"] == "float16" and len(fresh.manifest["splits"]["train"]["shards"]) == 4
    original = FeatureCache(digits_run["cache"]).load_split("test").features.numpy()
    np.testing.assert_allclose(fresh.load_split("test").features.numpy(), original, rtol=2e-3, atol=2e-3)


def test_extract_train_views_and_compare_samples_among_them(digits_run, tmp_path):
    checkpoint = digits_run["run"] / "checkpoint.pt"
    for name in ("a", "b"):
        assert invoke("extract", checkpoint, "--out", tmp_path / name, "--train-views", "2").exit_code == 0
    cache = FeatureCache(tmp_path / "a")
    train, views = cache.load_split("train"), cache.load_split("train_views")
    n = len(train)
    assert cache.manifest["splits"]["train_views"]["views"] == 2 and len(views) == 2 * n
    assert torch.equal(views.labels, train.labels.repeat(2))
    first, second = views.features[:n], views.features[n:]
    assert not torch.allclose(first, second) and not torch.allclose(first, train.features)  # augmented views
    # plain splits are the same as in the demo's cache, and the views are reproducible
    assert torch.equal(train.features, FeatureCache(digits_run["cache"]).load_split("train").features)
    assert torch.equal(views.features, FeatureCache(tmp_path / "b").load_split("train_views").features)

    on = invoke("compare", tmp_path / "a", "--methods", "crt,lws", "--json", "--bootstrap", "0")
    off = invoke("compare", tmp_path / "a", "--methods", "crt", "--json", "--bootstrap", "0", "--no-train-views")
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    summary_on, summary_off = json.loads(on.stdout), json.loads(off.stdout)
    assert summary_on["train_views"] == 2 and summary_off["train_views"] == 0
    assert all(row["chosen"]["train_views"] == 2 for row in summary_on["rows"])
    assert "train_views" not in summary_off["rows"][0]["chosen"]
    bad = invoke("extract", checkpoint, "--out", tmp_path / "c", "--train-views", "-1")
    assert_clean_error(bad, "--train-views must be an integer >= 0")
    assert not (tmp_path / "c").exists()
