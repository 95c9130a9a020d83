"""The hostile-input matrix: every bad option, corrupted file and misdirected path gets one line on stderr, exit
code 2, no traceback, and leaves the folder exactly as it was (checksums before and after).

Every case runs the real `ltcache` in its own process, in a private copy of the digits-LT run and cache. The
processes are started a few at a time when the first case is collected; each case is then its own test item.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import Case, assert_one_line_error, reseal, run_cases, write_file, write_toy_cache

pytestmark = pytest.mark.slow  # over a hundred real processes: CI runs it (.ci/run), the default suite does not


# ------------------------------------------------------------------------------------------ corruptions


def _shard(ws: Path, split: str = "train") -> Path:
    return ws / "cache" / split / "00000.h5"


def edit_shard(split: str, change: Callable, *, seal: bool = False) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        with h5py.File(_shard(ws, split), "r+") as f:
            change(f)
        if seal:
            reseal(ws / "cache")

    return setup


def edit_manifest(change: Callable[[dict], None], *, seal: bool = False) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "cache" / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
        if seal:
            reseal(ws / "cache")

    return setup


def edit_head(change: Callable, *, seal: bool = False) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        with h5py.File(ws / "cache" / "head.h5", "r+") as f:
            change(f)
        if seal:
            reseal(ws / "cache")

    return setup


def edit_checkpoint(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "run" / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return setup


def flip_byte(relative: str, offset: int) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x40
        path.write_bytes(bytes(data))

    return setup


def truncate(relative: str, keep: float) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return setup


class Payload:
    """A pickle that would create a file if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pickled_checkpoint(ws: Path) -> None:
    torch.save({"format": "ltcache-checkpoint", "version": 1, "model": Payload()}, ws / "evil.pt")


def pickled_features(ws: Path) -> None:
    torch.save({"features": Payload(), "labels": torch.zeros(3, dtype=torch.long)}, ws / "evil.pt")


def object_array(ws: Path) -> None:
    np.save(ws / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def feature_files(ws: Path, *, features=None, labels=None, name="train.npz") -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 4)).astype(np.float32) if features is None else features
    labels = np.arange(12) % 3 if labels is None else labels
    np.savez(ws / name, features=features, labels=labels)
    np.savez(ws / "test.npz", features=rng.normal(size=(6, 4)).astype(np.float32), labels=np.arange(6) % 3)


def nan_features(ws: Path) -> None:
    features = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    features[3, 1] = np.nan
    feature_files(ws, features=features)


def bad_head(ws: Path) -> None:
    feature_files(ws)
    np.savez(ws / "head.npz", weight=np.ones((3, 5), dtype=np.float32), bias=np.zeros(3, dtype=np.float32))


def symlinked_shard(ws: Path) -> None:
    """A shard replaced by a link to a file outside the cache, its hash recorded as if it belonged there."""
    _shard(ws).unlink()
    _shard(ws).symlink_to(ws / "run" / "checkpoint.pt")
    reseal(ws / "cache")


def inat_json(ws: Path) -> None:
    for split in ("train", "val"):
        write_file(f"inat/{split}2018.json", json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                          "annotations": [{"image_id": 1, "category_id": 0}]}))(ws)


def recipe(text: str) -> Callable[[Path], None]:
    return write_file("recipe.toml", text)


def _set(path: tuple, value):
    def change(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return change


_DELETE = object()
_TRAIN = ("train-backbone", "--out", "new-run", "--epochs", "1")


def _bounds(option: str, value: str, message: str) -> Case:
    return Case(f"train{option}={value}", (*_TRAIN, option, value), (option, message))


CASES = [
    # ---- every train-backbone option's bounds: nothing is created
    _bounds("--epochs", "0", "an integer >= 1"),
    _bounds("--batch-size", "0", "an integer >= 1"),
    _bounds("--lr", "0", "> 0"),
    _bounds("--lr", "nan", "a finite number"),
    _bounds("--lr", "-0.1", "> 0"),
    _bounds("--momentum", "-0.5", ">= 0 and < 1"),
    _bounds("--momentum", "1", ">= 0 and < 1"),
    _bounds("--weight-decay", "-1", ">= 0"),
    _bounds("--workers", "-1", ">= 0"),
    _bounds("--samples-per-class", "0", ">= 1"),
    _bounds("--n-max", "0", ">= 1"),
    _bounds("--imbalance-factor", "0", ">= 1"),
    _bounds("--imbalance-factor", "inf", "a finite number"),
    _bounds("--val-per-class", "-1", ">= 0"),
    _bounds("--seed", "-1", ">= 0"),
    _bounds("--image-size", "0", ">= 1"),
    _bounds("--profile", "diagonal", "one of: exponential, step, none"),
    Case("train-epochs-not-integer", (*_TRAIN[:-1], "1.5"), ("--epochs", "valid integer")),
    Case("train-unknown-option", (*_TRAIN, "--bogus", "1"), ("No such option: --bogus",)),
    Case("train-unknown-dataset", (*_TRAIN, "--dataset", "imagenet-xl"), ("unknown dataset 'imagenet-xl'",)),
    Case("train-unknown-loss", (*_TRAIN, "--loss", "hinge"), ("unknown loss 'hinge'",)),
    Case("train-unknown-backbone", (*_TRAIN, "--backbone", "resnet9000"), ("unknown backbone", "resnet50")),
    Case("train-loss-param-text", (*_TRAIN, "--loss", "focal", "--loss-param", "gamma=abc"),
         ("--loss-param gamma must be a finite number",)),
    Case("train-loss-param-range", (*_TRAIN, "--loss", "focal", "--loss-param", "gamma=-1"), (">= 0",)),
    Case("train-loss-param-beta", (*_TRAIN, "--loss", "cb_ce", "--loss-param", "beta=1"), ("beta", "< 1")),
    Case("train-loss-param-unknown", (*_TRAIN, "--loss-param", "gama=2"), ("no parameter 'gama'",)),
    # ---- where a run may go
    Case("train-out-cwd", ("train-backbone", "--out", ".", "--overwrite"), ("current folder",)),
    Case("train-out-parent", ("train-backbone", "--out", "..", "--overwrite"),
         ("current folder or one of its parents",), cwd="docs"),
    Case("train-out-file", ("train-backbone", "--out", "file.txt"), ("is not a folder",)),
    Case("train-out-docs", ("train-backbone", "--out", "docs", "--epochs", "1"), ("already exists", "--overwrite")),
    Case("train-out-docs-overwrite", ("train-backbone", "--out", "docs", "--overwrite"),
         ("not an ltcache run folder", "only replaces what ltcache made")),
    Case("train-out-under-file", ("train-backbone", "--out", "file.txt/run"), ("is a file",)),
    Case("train-diverging-overwrite", ("train-backbone", "--out", "run", "--overwrite", "--epochs", "2",
                                       "--lr", "1e30"), ("loss became nan",)),
    Case("train-recipe-in-out", ("train-backbone", "--config", "run/recipe.toml", "--overwrite"),
         ("holds this command's input",), setup=write_file("run/recipe.toml", 'out = "run"\nepochs = 1\n')),
    # ---- recipes: values must have their declared type
    Case("recipe-bool-as-string", ("train-backbone", "--config", "recipe.toml"),
         ("'overwrite' must be true or false", "'no' (a string)"), setup=recipe('out = "run"\noverwrite = "no"\n')),
    Case("recipe-int-as-string", ("train-backbone", "--config", "recipe.toml"),
         ("'epochs' must be an integer", "(a string)"), setup=recipe('out = "new"\nepochs = "3"\n')),
    Case("recipe-int-as-float", ("train-backbone", "--config", "recipe.toml"),
         ("'epochs' must be an integer", "1.5"), setup=recipe('out = "new"\nepochs = 1.5\n')),
    Case("recipe-negative-momentum", ("train-backbone", "--config", "recipe.toml"),
         ("'momentum' must be a finite number >= 0",), setup=recipe('[train]\nout = "new"\nmomentum = -0.9\n')),
    Case("recipe-loss-param-type", ("train-backbone", "--config", "recipe.toml"), ("loss_params.gamma",),
         setup=recipe('out = "new"\nloss = "focal"\nloss_params = { gamma = "2" }\n')),
    Case("recipe-unknown-key", ("train-backbone", "--config", "recipe.toml"), ("unknown key 'epochz'",),
         setup=recipe('out = "new"\nepochz = 3\n')),
    Case("recipe-invalid-toml", ("train-backbone", "--config", "recipe.toml"), ("is not valid TOML",),
         setup=recipe("out = [\n")),
    Case("recipe-binary", ("train-backbone", "--config", "recipe.toml"), ("not a UTF-8 text file",),
         setup=write_file("recipe.toml", bytes(range(256)))),
    # ---- resume
    Case("resume-not-a-run", ("train-backbone", "--resume", "docs"), ("not an ltcache run folder",)),
    Case("resume-with-other-options", ("train-backbone", "--resume", "run", "--epochs", "5"),
         ("--resume continues run with its own config", "--epochs")),
    # ---- extract: options, checkpoints, where a cache may go
    Case("extract-into-its-run", ("extract", "run/checkpoint.pt", "--out", "run", "--overwrite"),
         ("holds this command's input",)),
    Case("extract-over-docs", ("extract", "run/checkpoint.pt", "--out", "docs", "--overwrite"),
         ("not an ltcache cache folder",)),
    Case("extract-existing-cache", ("extract", "run/checkpoint.pt", "--out", "cache"), ("already exists",)),
    Case("extract-over-file", ("extract", "run/checkpoint.pt", "--out", "file.txt", "--overwrite"),
         ("is not a folder",)),
    Case("extract-over-fake-manifest", ("extract", "run/checkpoint.pt", "--out", "thesis", "--overwrite"),
         ("not an ltcache cache folder",), setup=lambda ws: (
             write_file("thesis/manifest.json", json.dumps({"schema_version": 1, "splits": {"train": {}},
                                                            "generation": "0"}))(ws),
             write_file("thesis/thesis.tex", "\\documentclass{article}\n")(ws))),
    Case("extract-over-another-source", ("extract", "run/checkpoint.pt", "--out", "toycache", "--overwrite"),
         ("is a cache folder of dataset toy / backbone none", "this command makes one of dataset digits-lt",
          "from the same source"), setup=lambda ws: write_toy_cache(ws / "toycache")),
    Case("train-over-another-backbone", ("train-backbone", "--out", "run", "--overwrite", "--backbone",
                                         "smallresnet14", "--epochs", "1"),
         ("is a run folder of dataset digits-lt / backbone smallresnet8", "from the same source")),
    Case("extract-dtype", ("extract", "run/checkpoint.pt", "--out", "c2", "--dtype", "float64"),
         ("--dtype must be one of: float32, float16",)),
    Case("extract-shard-rows", ("extract", "run/checkpoint.pt", "--out", "c2", "--shard-rows", "0"),
         ("--shard-rows must be an integer >= 1",)),
    Case("extract-batch-size", ("extract", "run/checkpoint.pt", "--out", "c2", "--batch-size", "-3"),
         ("--batch-size must be an integer >= 1",)),
    Case("extract-train-views", ("extract", "run/checkpoint.pt", "--out", "c2", "--train-views", "-1"),
         ("--train-views must be an integer >= 0",)),
    Case("extract-garbage-checkpoint", ("extract", "file.txt", "--out", "c2"),
         ("not a readable checkpoint", "never unpickles")),
    Case("extract-pickle-payload", ("extract", "evil.pt", "--out", "c2"),
         ("not a readable checkpoint", "never unpickles"),
         setup=pickled_checkpoint, absent=("weights_only",)),
    Case("extract-other-architecture", ("extract", "run/checkpoint.pt", "--out", "c2"),
         ("do not fit a smallresnet14", "another architecture"),
         setup=edit_checkpoint(lambda s: s["config"].update(backbone="smallresnet14"))),
    Case("extract-missing-model", ("extract", "run/checkpoint.pt", "--out", "c2"),
         ("damaged ltcache checkpoint", "'model'"), setup=edit_checkpoint(lambda s: s.pop("model"))),
    # ---- corrupted caches: compare, sweep-tau and info refuse, and write nothing
    Case("shard-flipped-byte", ("compare", "cache"), ("train/00000.h5 fails its sha256 check",),
         setup=flip_byte("cache/train/00000.h5", 24576 + 4000)),
    Case("shard-sign-flipped", ("sweep-tau", "cache"), ("test/00000.h5 fails its sha256 check",),
         setup=edit_shard("test", lambda f: f["features"].write_direct(-f["features"][:]))),
    Case("shard-truncated", ("compare", "cache"), ("val/00000.h5 fails its sha256 check",),
         setup=truncate("cache/val/00000.h5", 0.5)),
    Case("shard-deleted", ("compare", "cache"), ("train/00000.h5 is missing",),
         setup=lambda ws: _shard(ws).unlink()),
    Case("shard-nan-resealed", ("compare", "cache"), ("holds a NaN or infinite value (row 7)",),
         setup=edit_shard("train", lambda f: f["features"].__setitem__((7, 3), np.nan), seal=True)),
    Case("shard-inf-resealed", ("sweep-tau", "cache"), ("holds a NaN or infinite value",),
         setup=edit_shard("val", lambda f: f["features"].__setitem__((0, 0), np.inf), seal=True)),
    Case("shard-label-out-of-range", ("compare", "cache"), ("label 12, outside the 10 classes",),
         setup=edit_shard("test", lambda f: f["labels"].__setitem__(5, 12), seal=True)),
    Case("shard-index-repeated", ("compare", "cache"), ("sample indices fall outside", "or repeat"),
         setup=edit_shard("train", lambda f: f["index"].__setitem__(1, 0), seal=True)),
    Case("manifest-class-counts-edited", ("sweep-tau", "cache"), ("does not match its manifest_sha256",),
         setup=edit_manifest(_set(("class_counts", 0), 200))),
    Case("manifest-class-counts-resealed", ("compare", "cache"), ("class_counts", "disagree with the train labels"),
         setup=edit_manifest(_set(("class_counts", 0), 200), seal=True)),
    Case("manifest-missing-key", ("compare", "cache"), ("'feature_dim' must be a positive integer",),
         setup=edit_manifest(_set(("feature_dim",), _DELETE))),
    Case("manifest-feature-dim-text", ("info", "cache"), ("'feature_dim' must be a positive integer", "'abc'"),
         setup=edit_manifest(_set(("feature_dim",), "abc"))),
    Case("manifest-not-json", ("compare", "cache"), ("manifest.json is unreadable",),
         setup=write_file("cache/manifest.json", "{oops")),
    Case("manifest-binary", ("info", "cache"), ("manifest.json is unreadable",),
         setup=write_file("cache/manifest.json", bytes(range(256)))),
    Case("manifest-schema", ("compare", "cache"), ("schema version 99",),
         setup=edit_manifest(_set(("schema_version",), 99))),
    Case("manifest-path-escape", ("compare", "cache"), ("does not name a file inside the cache",),
         setup=edit_manifest(_set(("splits", "train", "shards", 0, "file"), "../run/checkpoint.pt"), seal=True)),
    Case("head-zero-row", ("sweep-tau", "cache"), ("head.h5 fails its sha256 check",),
         setup=edit_head(lambda f: f["weight"].__setitem__(3, 0.0))),
    Case("head-zero-row-resealed", ("sweep-tau", "cache"), ("class 3 is all zeros",),
         setup=edit_head(lambda f: f["weight"].__setitem__(3, 0.0), seal=True)),
    Case("head-nan-resealed", ("compare", "cache"), ("head.h5", "NaN or infinite"),
         setup=edit_head(lambda f: f["bias"].__setitem__(2, np.nan), seal=True)),
    Case("head-wrong-classes-resealed", ("sweep-tau", "cache"), ("should be (10, 64)",),
         setup=edit_head(lambda f: (f.__delitem__("weight"), f.create_dataset("weight", data=np.ones((9, 64)))),
                         seal=True)),
    Case("head-missing-bias-resealed", ("sweep-tau", "cache"), ("has no 'bias'",),
         setup=edit_head(lambda f: f.__delitem__("bias"), seal=True)),
    Case("shard-symlink-outside", ("compare", "cache"), ("train/00000.h5 leads outside the cache",),
         setup=symlinked_shard),
    Case("membership-corrupt", ("info", "cache", "--verify"), ("membership.h5 fails its sha256 check",),
         setup=flip_byte("cache/membership.h5", 2100)),
    Case("verify-flipped-shard", ("info", "cache", "--verify"), ("1 problem(s)", "test/00000.h5"),
         setup=flip_byte("cache/test/00000.h5", 24576 + 100)),
    # ---- stage-2 options and hyperparameters
    Case("compare-bootstrap", ("compare", "cache", "--bootstrap", "-5"), ("--bootstrap must be an integer >= 0",)),
    Case("compare-seeds", ("compare", "cache", "--seeds", "0"), ("--seeds must be an integer >= 1",)),
    Case("compare-many", ("compare", "cache", "--many", "-1"), ("--many must be an integer >= 0",)),
    Case("compare-crossed", ("compare", "cache", "--many", "20", "--few", "100"), ("must not exceed --many",)),
    Case("compare-select", ("compare", "cache", "--select", "test"), ("--select must be one of: val, train",)),
    Case("set-lr-text", ("compare", "cache", "--set", "crt.lr=abc"), ("crt.lr must be a finite number",)),
    Case("set-bool-typo", ("compare", "cache", "--methods", "lws", "--set", "lws.with_bias=ture"),
         ("lws.with_bias must be true or false", "'ture'")),
    Case("set-epochs-zero", ("compare", "cache", "--set", "crt.epochs=0"), ("crt.epochs must be an integer >= 1",)),
    Case("set-epochs-float", ("compare", "cache", "--set", "crt.epochs=2.5"), ("crt.epochs must be an integer",)),
    Case("set-grid-nan", ("compare", "cache", "--set", "tau_norm.taus=0,nan"), ("tau_norm.taus", "nan is not")),
    Case("set-solver", ("compare", "cache", "--set", "crt.solver=adam"), ("crt.solver must be one of: sgd, lbfgs",)),
    Case("set-twice", ("compare", "cache", "--set", "crt.lr=0.1", "--set", "crt.lr=0.2"), ("twice",)),
    Case("set-maxnorm-grid", ("compare", "cache", "--methods", "crt_maxnorm", "--set", "crt_maxnorm.max_norms=0,1"),
         ("max_norms", "> 0")),
    Case("compare-unknown-method", ("compare", "cache", "--methods", "joint,magic"), ("unknown method 'magic'",)),
    # ---- the issue-19 hyperparameters and the method cards' listing
    Case("set-gda-shrinkage", ("compare", "cache", "--methods", "gda", "--set", "gda.shrinkage=auto"),
         ("gda.shrinkage must be one of: closed_form, grid",)),
    Case("set-gda-alphas", ("compare", "cache", "--methods", "gda", "--set", "gda.alphas=0,1"), ("gda.alphas", "> 0")),
    Case("set-gda-normalize", ("compare", "cache", "--methods", "gda", "--set", "gda.normalize=yes please"),
         ("gda.normalize must be true or false",)),
    Case("set-cos-la-init", ("compare", "cache", "--methods", "cos_la", "--set", "cos_la.init=zeros"),
         ("cos_la.init must be one of: auto, text, means, random",)),
    Case("set-gla-without-text", ("compare", "cache", "--methods", "gla", "--set", "gla.estimate_on=train"),
         ("needs CLIP's zero-shot text head",)),
    Case("set-gla-estimate-split", ("compare", "cache", "--methods", "gla", "--set", "gla.estimate_on=test"),
         ("gla.estimate_on must be one of: val, train",)),
    Case("methods-markdown", ("methods", "--markdown", "html"), ("--markdown must be one of: table, reference",)),
    Case("methods-json-and-markdown", ("methods", "--json", "--markdown", "table"), ("not both",)),
    Case("sweep-huge-grid", ("sweep-tau", "cache", "--taus", "0:1e9:1e-9"), ("more than 10,000",)),
    Case("sweep-inf-grid", ("sweep-tau", "cache", "--taus", "0,inf"), ("--taus",)),
    Case("compare-out-file", ("compare", "cache", "--out", "file.txt"), ("--out file.txt is a file",)),
    Case("compare-out-docs", ("compare", "cache", "--out", "docs"), ("did not make for this cache",)),
    # ---- inat-splits
    Case("inat-missing-json", ("inat-splits", "docs", "--out", "splits"), ("train2018.json not found",)),
    Case("inat-binary-json", ("inat-splits", "inat", "--out", "splits"), ("is not an iNaturalist json",),
         setup=lambda ws: (inat_json(ws), write_file("inat/val2018.json", bytes(range(256)))(ws))),
    Case("inat-out-file", ("inat-splits", "inat", "--out", "file.txt"), ("is a file",), setup=inat_json),
    Case("inat-existing", ("inat-splits", "inat", "--out", "inat"), ("already exists", "--overwrite"),
         setup=lambda ws: (inat_json(ws), write_file("inat/iNaturalist18_train.txt", "mine\n")(ws))),
    # ---- import-features
    Case("import-object-array", ("import-features", "--out", "c2", "--train", "objects.npy", "--test", "objects.npy"),
         ("pickled Python objects",), setup=object_array, absent=("allow_pickle", "weights_only")),
    Case("import-pickle-payload", ("import-features", "--out", "c2", "--train", "evil.pt", "--test", "evil.pt"),
         ("pickled Python objects",), setup=pickled_features, absent=("weights_only",)),
    Case("import-nan", ("import-features", "--out", "c2", "--train", "train.npz", "--test", "test.npz"),
         ("NaN or infinite",), setup=nan_features),
    Case("import-float-labels", ("import-features", "--out", "c2", "--train", "train.npz", "--test", "test.npz"),
         ("labels must be integers",), setup=lambda ws: feature_files(ws, labels=np.arange(12) * 0.5)),
    Case("import-head-shape", ("import-features", "--out", "c2", "--train", "train.npz", "--test", "test.npz",
                               "--head", "head.npz"), ("weight must be [3, 4]",), setup=bad_head),
    Case("import-over-docs", ("import-features", "--out", "docs", "--overwrite", "--train", "train.npz", "--test",
                              "test.npz"), ("not an ltcache cache folder",), setup=feature_files),
]


# -------------------------------------------------------------------------------------------- the runner


def make_workspace(ws: Path, digits_run: dict) -> None:
    ws.mkdir(parents=True)
    shutil.copytree(digits_run["run"], ws / "run")
    shutil.copytree(digits_run["cache"], ws / "cache")
    (ws / "docs").mkdir()
    (ws / "docs" / "notes.txt").write_text("a user's own files\n")
    (ws / "file.txt").write_text("not a folder\n")


@pytest.fixture(scope="session")
def matrix(digits_run, tmp_path_factory) -> dict[str, dict]:
    return run_cases(CASES, lambda ws: make_workspace(ws, digits_run), tmp_path_factory.mktemp("hostile"))


def test_the_matrix_is_large():
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(matrix, case):
    outcome = matrix[case.id]
    assert_one_line_error(outcome["result"], case.fragments, case.absent)
    assert outcome["after"] == outcome["before"], "the command changed or left files behind"
