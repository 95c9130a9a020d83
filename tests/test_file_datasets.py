"""Benchmark-style datasets on tiny files the tests write: JPEG trees with split files, a CIFAR-100 pickle
folder, iNaturalist json, an ImageFolder of PNGs. Each goes through train-backbone and extract on the CPU."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, invoke
from ltcache.data.cifar import carve_cifar
from ltcache.data.profiles import exponential_profile

SMALL = ["--backbone", "resnet10", "--image-size", "32", "--epochs", "1", "--batch-size", "4"]


def write_image(path, seed, fmt="JPEG", size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def write_split_tree(root, counts, prefix="ImageNet_LT"):
    """train/val/test JPEGs for len(counts) classes and the three split files; returns the file per split."""
    files = {}
    per_split = {"train": counts, "val": [1] * len(counts), "test": [2] * len(counts)}
    for split, split_counts in per_split.items():
        lines = []
        for label, count in enumerate(split_counts):
            for k in range(count):
                relative = f"{split}/n{label:04d}/img_{k}.JPEG"
                write_image(root / relative, seed=hash((split, label, k)) % 2**32)
                lines.append(f"{relative} {label}")
        files[split] = root / f"{prefix}_{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def train_and_extract(tmp_path, *args):
    run, cache = tmp_path / "run", tmp_path / "cache"
    trained = invoke("train-backbone", *args, *SMALL, "--out", run)
    assert trained.exit_code == 0, trained.output
    extracted = invoke("extract", run / "checkpoint.pt", "--out", cache)
    assert extracted.exit_code == 0, extracted.output
    return json.loads((cache / "manifest.json").read_text())


def test_imagenet_lt_split_files(tmp_path):
    root = tmp_path / "imagenet"
    write_split_tree(root, [6, 4, 2, 1])
    manifest = train_and_extract(tmp_path, "--dataset", "imagenet-lt", "--root", root)
    assert manifest["class_counts"] == [6, 4, 2, 1]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 13, "val": 4, "test": 8}
    assert manifest["class_names"] == ["n0000", "n0001", "n0002", "n0003"]
    assert manifest["feature_dim"] == 512 and manifest["dataset"]["image_size"] == 32


def test_places_lt_with_split_dir_and_data_that_moved_before_extract(tmp_path):
    root, split_dir = tmp_path / "places", tmp_path / "splits"
    files = write_split_tree(root, [3, 1], prefix="Places_LT")
    split_dir.mkdir()
    for path in files.values():
        path.rename(split_dir / path.name)
    manifest = train_and_extract(tmp_path, "--dataset", "places-lt", "--root", root, "--split-dir", split_dir)
    assert manifest["class_counts"] == [3, 1]
    assert manifest["dataset"]["split_files"]["test"] == str(split_dir / "Places_LT_test.txt")

    moved_root, moved_splits = root.rename(tmp_path / "moved"), split_dir.rename(tmp_path / "moved_splits")
    lost = invoke("extract", tmp_path / "run" / "checkpoint.pt", "--out", tmp_path / "c2")
    assert_clean_error(lost, "not a folder")
    found = invoke("extract", tmp_path / "run" / "checkpoint.pt", "--out", tmp_path / "c2", "--root", moved_root,
                   "--split-dir", moved_splits)
    assert found.exit_code == 0, found.output
    assert json.loads((tmp_path / "c2" / "manifest.json").read_text())["dataset"]["root"] == str(moved_root)


def test_inat_json_to_split_files_and_a_selection_split_carved_from_train(tmp_path):
    root, json_dir, split_dir = tmp_path / "inat", tmp_path / "json", tmp_path / "splits"
    json_dir.mkdir()
    for split, counts in (("train", [5, 3, 2]), ("val", [2, 2, 2])):
        images, annotations = [], []
        for label, count in enumerate(counts):
            for k in range(count):
                name = f"train_val2018/Plantae/{label}/{split}_{k}.jpg"
                write_image(root / name, seed=len(images) + 100 * label)
                images.append({"id": len(images), "file_name": name})
                annotations.append({"image_id": images[-1]["id"], "category_id": label})
        (json_dir / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    converted = invoke("inat-splits", json_dir, "--out", split_dir)
    assert converted.exit_code == 0, converted.output
    assert (split_dir / "iNaturalist18_train.txt").read_text().splitlines()[0] == \
        "train_val2018/Plantae/0/train_0.jpg 0"
    again = invoke("inat-splits", json_dir, "--out", split_dir)
    assert_clean_error(again, "already exists")

    manifest = train_and_extract(tmp_path, "--dataset", "inat2018", "--root", root, "--split-dir", split_dir)
    # One image per class moves from train to the selection split; the official val file is the test split.
    assert manifest["class_counts"] == [4, 2, 1]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 7, "val": 3, "test": 6}
    assert "carved from iNaturalist18_train.txt" in manifest["dataset"]["selection_split"]


def write_cifar100(root, per_class_train=6, per_class_test=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, f)


def test_cifar100_lt_pickle_folder(tmp_path):
    root = tmp_path / "cifar"
    write_cifar100(root)
    manifest = train_and_extract(tmp_path, "--dataset", "cifar100-lt", "--root", root, "--n-max", "5",
                                 "--imbalance-factor", "5", "--val-per-class", "1")
    profile = exponential_profile(100, 5, 5)
    # 6 images per class: class 0 keeps 5 for train and gives its sixth to val, so nothing is borrowed.
    assert manifest["class_counts"] == profile
    assert manifest["dataset"]["val_taken_from_train"] == {}
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": sum(profile), "val": 100, "test": 200}
    assert manifest["class_names"][:2] == ["class0", "class1"] and manifest["feature_dim"] == 512


@pytest.mark.parametrize("num_classes, n_max, expected", [(10, 5000, 12406), (100, 500, 10847)])
def test_cifar_lt_train_sizes_match_the_literature(num_classes, n_max, expected):
    labels = np.repeat(np.arange(num_classes), n_max)  # the real CIFAR train sets: 5000 / 500 per class
    profile = exponential_profile(num_classes, n_max, 100)
    assert sum(profile) == expected
    exact, borrowed = carve_cifar(labels, profile, val_per_class=0, seed=0)
    assert len(exact["train"]) == expected and "val" not in exact and borrowed == {}
    with_val, borrowed = carve_cifar(labels, profile, val_per_class=20, seed=0)
    # Only the head class uses every image; its 20 val images come out of its train images.
    assert borrowed == {"0": 20}
    assert len(with_val["train"]) == expected - 20 and len(with_val["val"]) == 20 * num_classes
    assert not set(with_val["train"]) & set(with_val["val"])


def test_imagefolder_of_pngs_with_an_exponential_profile(tmp_path):
    root = tmp_path / "folder"
    for split, per_class in (("train", 7), ("test", 2)):
        for label in range(3):
            for k in range(per_class):
                write_image(root / split / f"class_{label}" / f"{k}.png", seed=label * 50 + k, fmt="PNG")
    manifest = train_and_extract(tmp_path, "--dataset", "imagefolder", "--root", root, "--profile", "exponential",
                                 "--n-max", "6", "--imbalance-factor", "3", "--val-per-class", "1")
    assert manifest["class_counts"] == exponential_profile(3, 6, 3) == [6, 3, 2]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 11, "val": 3, "test": 6}
    assert manifest["class_names"] == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("line, message", [
    ("train/n0000/img_0.JPEG", "ImageNet_LT_train.txt:2: expected 'relative/path label'"),
    ("train/n0000/img_0.JPEG zero", "ImageNet_LT_train.txt:2: label 'zero' is not an integer"),
    ("../outside.JPEG 0", "ImageNet_LT_train.txt:2: path '../outside.JPEG' escapes --root"),
    ("train/n0000/missing.JPEG 0", "image(s) listed in"),
])
def test_bad_split_lines_name_file_and_line(tmp_path, line, message):
    root = tmp_path / "imagenet"
    files = write_split_tree(root, [2, 1])
    lines = files["train"].read_text().splitlines()
    files["train"].write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    result = invoke("train-backbone", "--dataset", "imagenet-lt", "--root", root, *SMALL, "--out", tmp_path / "r")
    assert_clean_error(result, message)
    assert not (tmp_path / "r").exists()


def test_missing_split_file_out_of_range_label_and_empty_class(tmp_path):
    root = tmp_path / "imagenet"
    files = write_split_tree(root, [2, 1])
    args = ["train-backbone", "--dataset", "imagenet-lt", "--root", root, *SMALL, "--out", tmp_path / "r"]
    files["test"].write_text(files["test"].read_text() + "test/n0001/img_0.JPEG 7\n")
    assert_clean_error(invoke(*args), "label 7 is out of range 0..1")
    files["test"].unlink()
    assert_clean_error(invoke(*args), "split file", "ImageNet_LT_test.txt not found", "--split-dir")
    files = write_split_tree(root, [2, 1])
    files["train"].write_text("\n".join(files["train"].read_text().splitlines()[:2]) + "\ntrain/n0001/img_0.JPEG 2\n")
    assert_clean_error(invoke(*args), "class 1 has no training images")


@pytest.mark.parametrize("workers", ["0", "1"])  # with a worker process the error crosses a process boundary
def test_an_undecodable_image_is_named(tmp_path, workers):
    root = tmp_path / "imagenet"
    write_split_tree(root, [2, 1])
    (root / "train" / "n0001" / "img_0.JPEG").write_bytes(b"this is not a jpeg")
    result = invoke("train-backbone", "--dataset", "imagenet-lt", "--root", root, *SMALL, "--workers", workers,
                    "--out", tmp_path / "r")
    assert_clean_error(result, "cannot decode image", "n0001/img_0.JPEG")
    assert not (tmp_path / "r").exists()  # the failed run leaves no folder behind
