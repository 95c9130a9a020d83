"""import-features: caches from features computed elsewhere, in .npz, .pt and .npy."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke
from ltcache.cache import FeatureCache


def blobs(counts, seed, dim=6):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    centers = np.eye(len(counts), dim) * 4
    return (centers[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


@pytest.mark.parametrize("fmt", ["npz", "pt", "npy"])
def test_import_each_format_and_compare(tmp_path, fmt):
    files = {}
    for split, counts in (("train", [120, 30, 6]), ("val", [10, 10, 10]), ("test", [20, 20, 20])):
        features, labels = blobs(counts, seed=len(split))
        files[split] = tmp_path / f"{split}.{fmt}"
        if fmt == "npz":
            np.savez(files[split], features=features, labels=labels)
        elif fmt == "pt":
            torch.save({"features": torch.from_numpy(features), "labels": torch.from_numpy(labels)}, files[split])
        else:
            np.save(files[split], features)
            np.save(tmp_path / f"{split}.labels.npy", labels)
    out = tmp_path / "cache"
    result = invoke("import-features", "--out", out, "--train", files["train"], "--val", files["val"],
                    "--test", files["test"])
    assert result.exit_code == 0, result.output
    cache = FeatureCache(out)
    assert cache.manifest["dataset"]["provenance"] == "imported"
    assert cache.manifest["backbone"]["joint_head"]["source"] == "fitted: instance-balanced linear probe"
    assert cache.class_counts.tolist() == [120, 30, 6] and cache.feature_dim == 6
    np.testing.assert_array_equal(cache.load_split("test").features.numpy(), blobs([20, 20, 20], seed=4)[0])
    compared = invoke("compare", out, "--json", "--bootstrap", "0")
    assert compared.exit_code == 0, compared.output
    rows = {row["method"]: row for row in json.loads(compared.stdout)["rows"]}
    assert rows["ncm"]["all"] > 90  # well-separated blobs


def test_import_with_a_head_and_class_names(tmp_path):
    train, test = blobs([50, 5], seed=0, dim=3), blobs([10, 10], seed=1, dim=3)
    np.savez(tmp_path / "train.npz", features=train[0], labels=train[1])
    np.savez(tmp_path / "test.npz", features=test[0], labels=test[1])
    weight, bias = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -0.5], dtype=np.float32)
    np.savez(tmp_path / "head.npz", weight=weight, bias=bias)
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    result = invoke("import-features", "--out", tmp_path / "c", "--train", tmp_path / "train.npz",
                    "--test", tmp_path / "test.npz", "--head", tmp_path / "head.npz",
                    "--class-names", tmp_path / "names.txt")
    assert result.exit_code == 0, result.output
    cache = FeatureCache(tmp_path / "c")
    loaded_weight, loaded_bias = cache.joint_head()
    np.testing.assert_array_equal(loaded_weight.numpy(), weight)
    np.testing.assert_array_equal(loaded_bias.numpy(), bias)
    assert cache.class_names == ["cat", "dog"] and not cache.has_split("val")
    assert_clean_error(invoke("compare", tmp_path / "c"), "no val split", "--select train")
    assert invoke("compare", tmp_path / "c", "--select", "train", "--bootstrap", "0").exit_code == 0


def test_import_errors(tmp_path):
    train = blobs([5, 5], seed=0)
    np.savez(tmp_path / "train.npz", features=train[0], labels=train[1])
    np.savez(tmp_path / "nolabels.npz", features=train[0])
    np.savez(tmp_path / "wide.npz", features=np.zeros((4, 9), np.float32), labels=np.array([0, 1, 0, 1]))
    np.savez(tmp_path / "nan.npz", features=np.full((2, 6), np.nan, np.float32), labels=np.array([0, 1]))
    np.savez(tmp_path / "badhead.npz", weight=np.zeros((3, 6), np.float32))
    base = ["import-features", "--out", tmp_path / "c", "--train", tmp_path / "train.npz"]
    assert_clean_error(invoke(*base, "--test", tmp_path / "missing.npz"), "missing.npz not found")
    assert_clean_error(invoke(*base, "--test", tmp_path / "nolabels.npz"), "has no 'labels' array")
    assert_clean_error(invoke(*base, "--test", tmp_path / "wide.npz"), "different feature dimensions")
    assert_clean_error(invoke(*base, "--test", tmp_path / "nan.npz"), "NaN or infinite")
    assert_clean_error(invoke(*base, "--test", tmp_path / "train.npz", "--head", tmp_path / "badhead.npz"),
                       "weight must be [2, 6]")
    assert not (tmp_path / "c").exists()
