import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ltcache.cache import CacheWriter
from ltcache.cli import app
from ltcache.data.datasets import FASHION_DEFAULT_ROOT

FASHION_AVAILABLE = Path(FASHION_DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()


def lab_data(weight, bias, features, labels, class_counts, *, select="val", val=None, seed=0):
    """The one LabData builder of the suite: train = (features, labels), val the same split unless given."""
    import numpy as np

    from ltcache.cache import Split
    from ltcache.stage2 import LabData, LinearHead

    split = Split(features, labels)
    return LabData(train=split, val=val if val is not None else split, joint=LinearHead(weight, bias),
                   class_counts=np.asarray(class_counts), select=select, seed=seed)


def invoke(*args: str):
    """Run the CLI in-process; returns typer's Result (exit_code, output, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments):
    """Exit code 2, no traceback, and exactly one `error:` line, the last on stderr, holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may come before it
    for fragment in fragments:
        assert fragment in errors[0]


def write_toy_cache(path: Path, *, class_counts=(30, 12, 3), feature_dim=4, seed=0, shard_rows=16,
                    overwrite=False, dtype="float32", noise=0.5, text_head=False, val_per_class=10,
                    test_per_class=20, dataset_name="toy", class_names=None) -> Path:
    """A small cache of Gaussian blobs (one per class) with a joint head biased toward class 0; with `text_head`,
    also a zero-shot text head (as extract --zero-shot writes) near the class centres."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(class_counts)
    centers = torch.eye(num_classes, feature_dim) * 3

    def blob(counts):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return centers[labels] + noise * torch.randn(len(labels), feature_dim, generator=generator), labels

    writer = CacheWriter(path, feature_dim=feature_dim, shard_rows=shard_rows, overwrite=overwrite, dtype=dtype)
    splits = {"train": blob(class_counts), "val": blob([val_per_class] * num_classes),
              "test": blob([test_per_class] * num_classes)}
    for name, (features, labels) in splits.items():
        split = writer.split(name)
        order = torch.randperm(len(labels), generator=generator)  # rows arrive out of order, keyed by index
        split.add(features[order].numpy(), labels[order].numpy(), order.numpy())
        writer.finish_split(split, len(labels))
    weight = centers * torch.tensor([3.0, 1.0, 0.5] + [1.0] * (num_classes - 3))[:num_classes, None]
    writer.write_joint_head(weight, torch.zeros(num_classes))
    if text_head:
        writer.write_text_head(20 * centers / 3 + torch.randn(num_classes, feature_dim, generator=generator))
    names = list(class_names) if class_names is not None else [f"c{i}" for i in range(num_classes)]
    dataset = {"name": dataset_name, "root": None, "class_names": names,
               "train_class_counts": list(class_counts)}
    return writer.commit(dataset=dataset, backbone={"arch": "none", "checkpoint_sha256": "0" * 64})


def reseal(cache: Path) -> None:
    """Record the current sha256 of every file in the manifest, as a tool that rewrote them would: tests that
    edit a shard on purpose use it to reach the checks behind the hashes."""
    from ltcache.core.fsutil import canonical_sha256, sha256_file, write_json

    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            shard["sha256"] = sha256_file(cache / shard["file"])
    manifest["files"] = {name: sha256_file(cache / name) for name in manifest.get("files", {})}
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = canonical_sha256(manifest)
    write_json(cache / "manifest.json", manifest)


@pytest.fixture
def toy_cache(tmp_path) -> Path:
    return write_toy_cache(tmp_path / "cache")



def toy_steps(steps: int = 50) -> list[str]:
    """`--set METHOD.min_steps=STEPS` for every method that trains with SGD: toy caches need toy hyperparameters
    (the default 500 steps are for real data)."""
    from ltcache.stage2 import METHODS

    return [arg for name, entry in METHODS.items() if "min_steps" in entry.defaults
            for arg in ("--set", f"{name}.min_steps={steps}")]

@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> dict:
    """The README demo, run once through the CLI: digits-LT train -> extract -> compare."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "cache" / "reports" / "results.json").read_text())
    return {"out": out, "cache": out / "cache", "run": out / "run", "output": result.output, "summary": summary}


@pytest.fixture
def digits_cache_copy(digits_run, tmp_path) -> Path:
    """A private copy of the demo cache for tests that modify it."""
    return Path(shutil.copytree(digits_run["cache"], tmp_path / "cache"))


# ------------------------------------------------------------- real processes, for hostile inputs


def checksum(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, hidden ones included: files by content, folders and links by kind."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_symlink():
            entries[relative] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[relative] = "dir"
        else:
            entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


# A tiny open_clip tower (random weights, no download) for the tests of frozen CLIP backbones and their configs.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@dataclass(frozen=True)
class Case:
    """One case of a hostile matrix: the command line, the fragments its one error line must hold (and must not),
    the workspace edit before it, and the folder it runs in."""

    id: str
    args: tuple[str, ...]
    fragments: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    cwd: str = "."
    absent: tuple[str, ...] = field(default=())  # must not appear in the message (e.g. advice to unpickle)


def write_file(relative: str, content: bytes | str) -> Callable[[Path], None]:
    """A case setup that writes `content` at `relative` in the workspace."""

    def setup(ws: Path) -> None:
        path = ws / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def run_cases(cases, prepare, base: Path) -> dict[str, dict]:
    """The hostile matrices' runner: for each case (id, args, setup, cwd) a fresh workspace from `prepare(ws)`, its
    setup, then the real ltcache, a few processes at a time; returns per case the result and the workspace's
    checksums before and after."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case) -> tuple[str, dict]:
        ws = base / case.id
        prepare(ws)
        if case.setup is not None:
            case.setup(ws)
        before = checksum(ws)
        result = run_ltcache(case.args, cwd=ws / case.cwd)
        return case.id, {"result": result, "before": before, "after": checksum(ws)}

    with ThreadPoolExecutor(max(2, min(4, (os.cpu_count() or 2) + 1))) as pool:
        return dict(pool.map(run, cases))


def run_ltcache(args, *, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    # PYTHONSAFEPATH: as the `ltcache` console script runs, the current folder is not on sys.path (python -m would
    # put it there, and a json.py in a test's folder would shadow the standard library's)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1",
           **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "ltcache", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, fragments=(), absent=()) -> str:
    """Exit 2, no traceback, and one `error:` line, the last line on stderr, holding every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for fragment in absent:
        assert fragment not in errors[0], errors[0]
    return errors[0]
