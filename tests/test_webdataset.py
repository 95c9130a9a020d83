"""--dataset webdataset: tar shards the tests write (with the `webdataset` package's TarWriter and with plain
tarfile), through train-backbone and extract, in one process and under torchrun, and the hostile cases."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from conftest import assert_clean_error, checksum, invoke
from ltcache.cache import FeatureCache

SMALL = ["--backbone", "resnet10", "--image-size", "32", "--epochs", "1", "--batch-size", "4"]


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shards(root, counts, *, per_shard=5):
    """train (long-tailed `counts`), val (1 per class) and test (2 per class) as WebDataset shards: train with
    webdataset.TarWriter (JPEG + .cls), val and test with tarfile (PNG + .json), `per_shard` samples a shard."""
    root.mkdir(parents=True, exist_ok=True)
    per_split = {"train": counts, "val": [1] * len(counts), "test": [2] * len(counts)}
    for split, split_counts in per_split.items():
        samples = [(label, k) for label, count in enumerate(split_counts) for k in range(count)]
        for number, start in enumerate(range(0, len(samples), per_shard)):
            path = root / f"{split}-{number:06d}.tar"
            chunk = samples[start : start + per_shard]
            if split == "train":
                with webdataset.TarWriter(str(path)) as sink:
                    for label, k in chunk:
                        sink.write({"__key__": f"s{label}_{k}", "jpg": image_bytes(label * 100 + k), "cls": label})
            else:
                with tarfile.open(path, "w") as tar:
                    for label, k in chunk:
                        for name, data in ((f"{split}/s{label}_{k}.png", image_bytes(label * 7 + k, "PNG")),
                                           (f"{split}/s{label}_{k}.json", json.dumps({"label": label}).encode())):
                            info = tarfile.TarInfo(name)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds") / "shards", [9, 5, 3, 2])


@pytest.fixture(scope="module")
def wds_run(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("wds-run") / "run"
    trained = invoke("train-backbone", "--dataset", "webdataset", "--root", shards, *SMALL, "--out", run)
    assert trained.exit_code == 0, trained.output
    return run


def test_webdataset_shards_train_and_extract_in_one_process_and_under_torchrun(wds_run, tmp_path):
    one = invoke("extract", wds_run / "checkpoint.pt", "--out", tmp_path / "one", "--shard-rows", "4")
    assert one.exit_code == 0, one.output
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["class_counts"] == [9, 5, 3, 2]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 19, "val": 4, "test": 8}
    assert manifest["dataset"]["name"] == "webdataset" and len(manifest["dataset"]["shards"]["train"]) == 4
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ltcache", "extract", str(wds_run / "checkpoint.pt"), "--out", str(tmp_path / "two"),
               "--shard-rows", "4"]
    two = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    for split in ("train", "val", "test"):
        x, y = a.load_split(split), b.load_split(split)
        assert torch.equal(x.labels, y.labels), split
        assert torch.allclose(x.features, y.features, atol=1e-5), split
    labels = a.load_split("train").labels.tolist()
    assert labels == [0] * 9 + [1] * 5 + [2] * 3 + [3] * 2  # sample index = position in shard-name order


def test_webdataset_without_val_carves_one_and_class_names_come_from_classes_txt(tmp_path):
    root = write_shards(tmp_path / "shards", [6, 4, 3, 2])
    for path in root.glob("val-*.tar"):
        path.unlink()
    (root / "classes.txt").write_text("ant\nbee\ncat\ndog\n")
    run = tmp_path / "run"
    trained = invoke("train-backbone", "--dataset", "webdataset", "--root", root, *SMALL, "--out", run)
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())["dataset"]
    assert config["class_names"] == ["ant", "bee", "cat", "dog"]
    assert config["train_class_counts"] == [5, 3, 2, 1] and config["split_rows"]["val"] == 4


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("case, message", [
    ("no-train", "has no train shards"),
    ("no-label", "has no label (.cls or .json)"),
    ("bad-label", "is not an integer from 0 to 999999"),
    ("compressed", "decompress the shards first"),
    ("truncated", "cannot read tar shard"),
])
def test_hostile_shards_are_one_line_errors_and_nothing_is_written(tmp_path, case, message):
    root = write_shards(tmp_path / "shards", [3, 2])
    if case == "no-train":
        for path in root.glob("train-*.tar"):
            path.unlink()
    elif case == "no-label":
        _tar(root / "train-000009.tar", [("x.jpg", image_bytes(1))])
    elif case == "bad-label":
        _tar(root / "train-000009.tar", [("x.jpg", image_bytes(1)), ("x.cls", b"minus one")])
    elif case == "compressed":
        for path in root.glob("train-*.tar"):
            path.rename(path.with_suffix(".tar.gz"))
    elif case == "truncated":
        path = root / "train-000000.tar"
        path.write_bytes(path.read_bytes()[:700])
    before = checksum(tmp_path)
    result = invoke("train-backbone", "--dataset", "webdataset", "--root", root, *SMALL, "--out", tmp_path / "run")
    assert_clean_error(result, message)
    assert checksum(tmp_path) == before and not (tmp_path / "run").exists()
