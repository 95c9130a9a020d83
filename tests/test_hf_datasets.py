"""--dataset hf: Hugging Face datasets on local disk (save_to_disk folders and parquet files), written here with the
datasets library itself; nothing is downloaded."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, checksum, invoke
from ltcache.cache import FeatureCache
from ltcache.data import DatasetSpec, build_dataset

NAMES = ["cat", "dog", "eel"]


def images(counts, seed):
    rng = np.random.default_rng(seed)
    pictures, labels = [], []
    for label, count in enumerate(counts):
        for _ in range(count):
            base = np.zeros((24, 24, 3), dtype=np.uint8)
            base[..., label] = 90
            pictures.append(Image.fromarray((base + rng.integers(0, 60, base.shape)).astype(np.uint8)))
            labels.append(label)
    return {"image": pictures, "label": labels}


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    splits = {"train": images([20, 8, 4], 0), "test": images([4, 4, 4], 1)}
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict(rows, features=features)
                                    for name, rows in splits.items()})
    dataset.save_to_disk(str(folder / "disk"))
    (folder / "parquet" / "data").mkdir(parents=True)
    for name in splits:
        dataset[name].to_parquet(str(folder / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    with_val = datasets.DatasetDict({**dataset, "validation": datasets.Dataset.from_dict(images([2, 2, 2], 2),
                                                                                        features=features)})
    with_val.save_to_disk(str(folder / "with_val"))
    return {"root": folder, "splits": splits}


def test_a_save_to_disk_folder_and_its_parquet_files_give_the_same_cache(tmp_path, hf_dataset):
    root = hf_dataset["root"]
    caches = {}
    for layout in ("disk", "parquet"):
        result = invoke("extract", "--backbone", "timm:test_resnet", "--dataset", "hf", "--root", root / layout,
                        "--val-per-class", "2", "--out", tmp_path / layout)
        assert result.exit_code == 0, result.output
        caches[layout] = FeatureCache(tmp_path / layout)
    disk, parquet = caches["disk"], caches["parquet"]
    assert disk.manifest["class_names"] == NAMES and disk.class_counts.tolist() == [18, 6, 2]  # 2 per class to val
    assert disk.manifest["dataset"]["hf_splits"] == {"train": "train", "val": "train", "test": "test"}
    for split in ("train", "val", "test"):
        a, b = disk.load_split(split), parquet.load_split(split)
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.features, b.features, atol=1e-5)
    # test rows keep the split's order: row i is image i of the test split, with its label
    assert disk.load_split("test").labels.tolist() == hf_dataset["splits"]["test"]["label"]
    compared = invoke("compare", tmp_path / "disk", "--methods", "joint,ncm,knn", "--bootstrap", "0", "--json")
    assert compared.exit_code == 0, compared.output
    assert {row["method"] for row in json.loads(compared.stdout)["rows"]} == {"joint", "ncm", "knn"}


def test_a_validation_split_is_used_as_val_and_the_images_decode_as_saved(hf_dataset):
    data = build_dataset(DatasetSpec("hf", root=str(hf_dataset["root"] / "with_val")))
    assert data.extra["hf_splits"] == {"train": "train", "val": "validation", "test": "test"}
    assert data.class_counts == [20, 8, 4] and len(data.splits["val"]) == 6
    original = np.asarray(hf_dataset["splits"]["test"]["image"][5])
    assert np.array_equal(np.asarray(data.splits["test"].image(5)), original)  # PNG bytes: lossless


def test_bad_hf_datasets_are_one_line_errors_and_write_nothing(tmp_path, hf_dataset):
    root = tmp_path / "bad"
    table = pa.table({"picture": [b"x"], "label": [0]})
    (root / "nolabel").mkdir(parents=True)
    unlabelled = pa.table({"image": [{"bytes": b"x", "path": None}], "target": [0]})
    pq.write_table(unlabelled, root / "nolabel" / "train.parquet")
    pq.write_table(unlabelled, root / "nolabel" / "test.parquet")
    (root / "noimage").mkdir()
    pq.write_table(table, root / "noimage" / "train.parquet")
    pq.write_table(table, root / "noimage" / "test.parquet")
    (root / "notest").mkdir()
    pq.write_table(table, root / "notest" / "train.parquet")
    (root / "strings").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), root / "strings" / "train.parquet")
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), root / "strings" / "test.parquet")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    broken = [{"bytes": b"not an image", "path": None}] * 3
    pq.write_table(pa.table({"image": broken, "label": [0, 0, 0]}), root / "broken" / "train.parquet")
    pq.write_table(pa.table({"image": broken[:1], "label": [0]}), root / "broken" / "test.parquet")
    before = checksum(tmp_path)
    out = ("--backbone", "timm:test_resnet", "--dataset", "hf", "--out", tmp_path / "c")
    cases = [
        ((), "needs --root"),
        (("--root", root / "empty"), "neither a save_to_disk dataset"),
        (("--root", root / "nolabel"), "no label column 'label'; its columns are image, target"),
        (("--root", root / "noimage", "--val-per-class", "0"), "no image column 'image'"),
        (("--root", root / "notest"), "no test split"),
        (("--root", root / "strings"), "must hold class numbers"),
        (("--root", hf_dataset["root"] / "disk"), "not enough to carve a val split of 20"),
        (("--root", root / "broken", "--val-per-class", "1"), "cannot decode image"),
    ]
    for args, message in cases:
        assert_clean_error(invoke("extract", *out, *args), message)
    assert checksum(tmp_path) == before and not (tmp_path / "c").exists()
