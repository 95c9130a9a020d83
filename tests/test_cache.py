import json
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import reseal, write_toy_cache
from ltcache.cache import CacheWriter, FeatureCache
from ltcache.core.errors import LtcacheError
from ltcache.heads import LinearHead


def test_round_trip_orders_rows_by_sample_index_across_shards(tmp_path):
    writer = CacheWriter(tmp_path / "c", feature_dim=3, shard_rows=4)
    split = writer.split("train")
    features = np.arange(30, dtype=np.float32).reshape(10, 3)
    labels = np.arange(10) % 3
    order = np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    split.add(features[order][:6], labels[order][:6], order[:6])
    split.add(features[order][6:], labels[order][6:], order[6:])
    writer.finish_split(split, 10)
    writer.write_joint_head(torch.ones(3, 3), torch.zeros(3))
    path = writer.commit(dataset={"name": "t", "class_names": ["a", "b", "c"], "train_class_counts": [4, 3, 3]},
                         backbone={"arch": "x"})
    cache = FeatureCache(path)
    assert [s["rows"] for s in cache.manifest["splits"]["train"]["shards"]] == [4, 4, 2]
    loaded = cache.load_split("train")
    np.testing.assert_array_equal(loaded.features.numpy(), features)
    np.testing.assert_array_equal(loaded.labels.numpy(), labels)
    assert cache.verify() == []


def test_float16_cache_stays_float16_in_memory_and_is_mapped(tmp_path):
    writer = CacheWriter(tmp_path / "c", feature_dim=2, dtype="float16")
    split = writer.split("train")
    split.add(np.array([[0.5, 1.25], [2.0, -1.0]]), np.array([0, 1]), np.array([0, 1]))
    writer.finish_split(split, 2)
    writer.write_joint_head(torch.eye(2), torch.zeros(2))
    path = writer.commit(dataset={"name": "t", "class_names": ["a", "b"], "train_class_counts": [1, 1]},
                         backbone={})
    with h5py.File(path / "train" / "00000.h5") as f:
        assert f["features"].dtype == np.float16
    loaded = FeatureCache(path).load_split("train")
    assert loaded.features.dtype == torch.float16  # half the RAM; stage 2 upcasts a block at a time
    if sys.platform.startswith("linux"):
        assert _is_mapped(loaded.features)
    np.testing.assert_array_equal(loaded.features.float().numpy(), [[0.5, 1.25], [2.0, -1.0]])


def test_cache_opens_with_plain_h5py_and_json(toy_cache):
    manifest = json.loads((toy_cache / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["class_counts"] == [30, 12, 3]
    total = 0
    for shard in manifest["splits"]["train"]["shards"]:
        with h5py.File(toy_cache / shard["file"]) as f:
            assert f["features"].shape == (shard["rows"], manifest["feature_dim"])
            assert f["labels"].dtype == np.int64 and f["index"].dtype == np.int64
            total += shard["rows"]
    assert total == manifest["splits"]["train"]["rows"] == 45
    with h5py.File(toy_cache / "head.h5") as f:
        assert f["weight"].shape == (3, 4) and f["bias"].shape == (3,)


def test_reader_rejects_a_shard_whose_shape_disagrees_with_the_manifest(toy_cache):
    shard = toy_cache / "train" / "00000.h5"
    with h5py.File(shard, "r+") as f:
        rows = f["features"].shape[0]
        del f["features"]
        f.create_dataset("features", data=np.zeros((rows, 5), dtype=np.float32))
    assert FeatureCache(toy_cache).verify() == ["train/00000.h5"]
    with pytest.raises(LtcacheError, match=r"train/00000.h5 fails its sha256 check"):
        FeatureCache(toy_cache).load_split("train")
    reseal(toy_cache)  # hashes that agree: the shape check behind them still catches it
    with pytest.raises(LtcacheError, match=r"00000.h5: it has features \(16, 5\) but the manifest says \(16, 4\)"):
        FeatureCache(toy_cache).load_split("train")


def test_missing_coverage_is_an_error(tmp_path):
    writer = CacheWriter(tmp_path / "c", feature_dim=2)
    split = writer.split("train")
    split.add(np.zeros((2, 2)), np.array([0, 1]), np.array([0, 0]))
    with pytest.raises(LtcacheError, match="exactly once"):
        writer.finish_split(split, 2)


def test_unreadable_or_missing_manifest(tmp_path, toy_cache):
    with pytest.raises(LtcacheError, match="not found"):
        FeatureCache(tmp_path / "nope")
    (toy_cache / "manifest.json").write_text("{ not json")
    with pytest.raises(LtcacheError, match="manifest.json is unreadable"):
        FeatureCache(toy_cache)


def test_existing_cache_is_kept_without_overwrite_and_replaced_only_on_commit(tmp_path):
    path = write_toy_cache(tmp_path / "cache", seed=0)
    before = (path / "manifest.json").read_text()
    with pytest.raises(LtcacheError, match="already exists"):
        CacheWriter(path, feature_dim=4)
    writer = CacheWriter(path, feature_dim=4, overwrite=True)  # staging elsewhere: old cache still intact
    writer.abort()
    assert (path / "manifest.json").read_text() == before
    write_toy_cache(path, seed=1, class_counts=(40, 10, 2), overwrite=True)
    assert FeatureCache(path).manifest["class_counts"] == [40, 10, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no staging or retired folder left behind


def test_heads_round_trip(toy_cache):
    cache = FeatureCache(toy_cache)
    cache.save_head("tau_norm", LinearHead(torch.eye(3, 4)), {"tau": 0.7})
    head, hyperparameters = cache.load_head("tau_norm")
    assert head.bias is None and torch.equal(head.weight, torch.eye(3, 4)) and hyperparameters == {"tau": 0.7}
    assert cache.head_names() == ["tau_norm"]


def _is_mapped(tensor: torch.Tensor) -> bool:
    """Whether the tensor's first byte lies in a file mapping of a cache shard (from /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return len(fields) >= 6 and fields[-1].endswith(".h5")
    return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="mapping is Linux-only")
def test_in_order_aligned_shards_are_mapped_copy_on_write(tmp_path):
    rows, dim = 600, 4  # shards of 256 rows x 4 floats = one 4 KiB page each, then a ragged last shard
    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(rows) % 3
    writer = CacheWriter(tmp_path / "c", feature_dim=dim, shard_rows=256)
    for name in ("train", "val", "test"):
        split = writer.split(name)
        split.add(features.numpy(), labels.numpy(), np.arange(rows))  # in index order, as extract writes
        writer.finish_split(split, rows)
    writer.write_joint_head(torch.eye(3, dim), torch.zeros(3))
    writer.commit(dataset={"name": "toy", "class_names": ["a", "b", "c"], "train_class_counts": [200] * 3},
                  backbone={"arch": "none"})
    cache = FeatureCache(tmp_path / "c")
    assert len(cache.manifest["splits"]["train"]["shards"]) == 3
    loaded = cache.load_split("train")
    assert _is_mapped(loaded.features)
    assert torch.equal(loaded.features, features) and torch.equal(loaded.labels, labels)
    loaded.features.mul_(0)  # private to this process: the shards on disk keep their values
    assert torch.equal(cache.load_split("train").features, features)
    assert not cache.verify()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
def test_out_of_order_or_unaligned_shards_are_read(toy_cache):
    cache = FeatureCache(toy_cache)  # rows arrive shuffled, in shards of 16 rows x 4 floats
    split = cache.load_split("train")
    assert not _is_mapped(split.features)
    with h5py.File(toy_cache / cache.manifest["splits"]["train"]["shards"][0]["file"], "r") as f:
        index, rows = f["index"][:], f["features"][:]
    assert torch.equal(split.features[torch.from_numpy(index)], torch.from_numpy(rows))
