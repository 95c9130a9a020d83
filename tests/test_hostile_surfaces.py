"""The hostile matrix on the surfaces added after the first one (issue 20): compare's results folders, the report,
plugins, zero-shot templates and open_clip configs, WebDataset labels, imported features, results.json, the
studies script. Every error case runs the real `ltcache` in its own process in a private copy of a workspace and
must end in exit code 2, one `error:` line, no traceback, and the workspace exactly as it was (checksums).

The workspace: two toy caches of different datasets, each compared by a real `ltcache compare` (one into the cache,
one into a compare --out folder, both from the workspace folder with relative paths, as a user types them), and a
folder of a user's own files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    TINY_CLIP,
    Case,
    assert_one_line_error,
    checksum,
    reseal,
    run_cases,
    run_ltcache,
    write_file,
    write_toy_cache,
)

pytestmark = pytest.mark.slow  # about fifty real processes: CI runs them (.ci/run), the default suite does not

TOY = ("--methods", "joint,ncm,tau_norm", "--bootstrap", "0")
REPO = Path(__file__).resolve().parent.parent


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for step in setups:
            step(ws)

    return setup


def edit_results(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "cache" / "reports" / "results.json"
        results = json.loads(path.read_text())
        change(results)
        path.write_text(json.dumps(results))

    return setup


def features(name: str = "feats.npz", *, labels=None) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        rng = np.random.default_rng(0)
        np.savez(ws / name, features=rng.normal(size=(12, 4)).astype(np.float32),
                 labels=np.arange(12) % 3 if labels is None else np.asarray(labels))

    return setup


def plugin(name: str, body: str) -> Callable[[Path], None]:
    header = "import torch\nimport ltcache\nfrom ltcache import Fitted, LinearHead\n\n"
    return write_file(name, header + body)


NAN_HEAD = '''
@ltcache.method("nanhead", summary="returns NaN weights")
def fit(data):
    weight = torch.full_like(data.joint.weight, float("nan"))
    return Fitted(LinearHead(weight, None), {})
'''
FEW_CLASSES = '''
@ltcache.method("twoclass", summary="a head of two classes")
def fit(data):
    return Fitted(LinearHead(data.joint.weight[:2].clone(), None), {})
'''
WRONG_DIM = '''
@ltcache.method("widehead", summary="a head for wider features")
def fit(data):
    return Fitted(LinearHead(torch.ones(data.num_classes, 9), None), {})
'''
MUTATES = '''
@ltcache.method("mutates", summary="scales the shared features in place")
def fit(data):
    data.train.features.mul_(2)
    return Fitted(LinearHead(data.joint.weight.clone(), None), {})
'''
NUMPY_MUTATES = '''
@ltcache.method("npmutates", summary="writes the shared features through a NumPy view")
def fit(data):
    data.train.features.numpy()[0, 0] += 1.0
    return Fitted(LinearHead(data.joint.weight.clone(), None), {})
'''
NAMED_ALL = '''
@ltcache.method("all", summary="shadows --methods all")
def fit(data):
    return Fitted(LinearHead(data.joint.weight.clone(), None), {})
'''
NAMED_CRT = '''
@ltcache.method("CRT", summary="differs from crt only by case")
def fit(data):
    return Fitted(LinearHead(data.joint.weight.clone(), None), {})
'''


def webdataset_shards(label: bytes) -> Callable[[Path], None]:
    """train / test shards of one sample each class, the first train sample's .cls holding `label`."""

    def setup(ws: Path) -> None:
        from PIL import Image

        root = ws / "shards"
        root.mkdir()
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        for split in ("train", "test"):
            with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
                for k in range(3):
                    for name, data in ((f"s{k}.png", buffer.getvalue()),
                                       (f"s{k}.cls", label if (split, k) == ("train", 0) else str(k).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

    return setup


def clip_config(**vision) -> Callable[[Path], None]:
    config = json.loads(json.dumps(TINY_CLIP))
    config["vision_cfg"].update(vision)
    return write_file("clip.json", json.dumps(config))


def stale_cache(ws: Path) -> None:
    """The cache extracted again since results/ was computed on it: a new generation, sealed."""
    path = ws / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["generation"] = "f" * 32
    path.write_text(json.dumps(manifest))
    reseal(ws / "cache")


def fake_cache(ws: Path) -> None:
    """A user's folder whose manifest.json happens to carry schema_version and splits."""
    (ws / "thesis").mkdir()
    (ws / "thesis" / "manifest.json").write_text(json.dumps({"schema_version": 1, "splits": {"train": {}},
                                                             "generation": "0"}))
    (ws / "thesis" / "thesis.tex").write_text("\\documentclass{article}\n")


TEMPLATE = ("extract", "--backbone", "open_clip:clip.json", "--dataset", "digits-lt", "--zero-shot", "--out", "c2")

CASES = [
    # ---- data loss: where compare may write
    Case("compare-out-other-cache", ("compare", "cache", "--out", "other", *TOY), ("--out other is another cache",)),
    Case("compare-out-other-results", ("compare", "cache", "--out", "other-results", *TOY),
         ("holds the compare results of another cache",)),
    Case("compare-out-inside-cache", ("compare", "cache", "--out", "cache/mine", *TOY), ("lies inside the cache",)),
    Case("compare-out-holds-cache", ("compare", "cache", "--out", ".", *TOY), ("holds the cache",)),
    Case("compare-out-user-folder", ("compare", "cache", "--out", "docs", *TOY),
         ("did not make for this cache", "new or empty folder")),
    Case("compare-out-a-file", ("compare", "cache", "--out", "docs/notes.txt", *TOY), ("is a file",)),
    Case("compare-out-under-a-file", ("compare", "cache", "--out", "docs/notes.txt/x", *TOY), ("is a file",)),
    Case("import-over-fake-manifest", ("import-features", "--out", "thesis", "--overwrite", "--train", "feats.npz",
                                       "--test", "feats.npz"), ("not an ltcache cache folder",),
         setup=both(fake_cache, features())),
    # ---- silently wrong results
    Case("plugin-nan-head", ("compare", "cache", "--plugin", "p.py", "--methods", "nanhead", "--bootstrap", "0"),
         ("method nanhead", "NaN or infinite"), setup=plugin("p.py", NAN_HEAD)),
    Case("plugin-class-count", ("compare", "cache", "--plugin", "p.py", "--methods", "twoclass", "--bootstrap", "0"),
         ("method twoclass", "head of 2 classes for a cache of 3"), setup=plugin("p.py", FEW_CLASSES)),
    Case("plugin-feature-size", ("compare", "cache", "--plugin", "p.py", "--methods", "widehead", "--bootstrap", "0"),
         ("method widehead", "cannot score 4-d features"), setup=plugin("p.py", WRONG_DIM)),
    Case("plugin-mutates-features", ("compare", "cache", "--plugin", "p.py", "--methods", "mutates,joint"),
         ("method mutates changed the shared features",), setup=plugin("p.py", MUTATES)),
    Case("plugin-mutates-numpy-view", ("compare", "cache", "--plugin", "p.py", "--methods", "npmutates"),
         ("method npmutates changed the shared features",), setup=plugin("p.py", NUMPY_MUTATES)),
    Case("plugin-named-all", ("compare", "cache", "--plugin", "p.py"), ("name 'all' is reserved",),
         setup=plugin("p.py", NAMED_ALL)),
    Case("plugin-case-clash", ("methods", "--plugin", "p.py"),
         ("'CRT' differs from the registered 'crt' only by case",), setup=plugin("p.py", NAMED_CRT)),
    Case("plugin-stdlib-name", ("compare", "cache", "--plugin", "json"),
         ("--plugin json loaded", "registered nothing", "pass --plugin ./json.py"), setup=plugin("json.py", NAN_HEAD)),
    Case("report-stale-from-elsewhere", ("report", "../results", "--out", "../page"),
         ("computed on an earlier version of cache",), setup=stale_cache, cwd="docs"),
    Case("report-two-datasets-one-label", ("report", "cache", "other", "--by", "selected_on", "--out", "page"),
         ("share the label 'val' but differ in dataset",)),
    Case("sweep-tau-huge", ("sweep-tau", "cache", "--taus", "1e6"), ("--taus must be", "<= 100")),
    Case("template-doubled-braces", (*TEMPLATE, "--templates", "t.txt"), ("exactly one {}", "a photo of a {{}}"),
         setup=both(clip_config(), write_file("t.txt", "a photo of a {{}}.\n"))),
    Case("template-unbalanced", (*TEMPLATE, "--templates", "t.txt"), ("exactly one {}",),
         setup=both(clip_config(), write_file("t.txt", "a photo of a {.\n"))),
    Case("template-two-fields", (*TEMPLATE, "--templates", "t.txt"), ("exactly one {}",),
         setup=both(clip_config(), write_file("t.txt", "a {} of a {}.\n"))),
    Case("template-not-utf8", (*TEMPLATE, "--templates", "t.txt"), ("is not UTF-8 text",),
         setup=both(clip_config(), write_file("t.txt", b"a photo of a \xff{}\n"))),
    Case("clip-config-negative-width", (*TEMPLATE,), ("vision_cfg.width = -64",), setup=clip_config(width=-64)),
    Case("clip-config-enormous-width", (*TEMPLATE,), ("vision_cfg.width = 4294967296",),
         setup=clip_config(width=2**32)),
    Case("clip-config-huge-tower", (*TEMPLATE,), ("more than 10^10 weights",),
         setup=clip_config(width=2**19, layers=2**10)),
    # ---- numbers that overflow, text that is not UTF-8, malformed results.json
    Case("set-batch-size-huge", ("compare", "cache", "--set", "crt.batch_size=99999999999999999999"),
         ("crt.batch_size must be an integer >= 1 and <= 16777216",)),
    Case("wds-label-2-40", ("train-backbone", "--dataset", "webdataset", "--root", "shards", "--out", "r", "--epochs",
                            "1"), ("label b'1099511627776' is not an integer from 0 to 999999",),
         setup=webdataset_shards(str(2**40).encode())),
    Case("import-label-1e12", ("import-features", "--out", "c2", "--train", "big.npz", "--test", "big.npz"),
         ("label 1000000000000 is outside 0..999999",),
         setup=features("big.npz", labels=[0, 1, 2] * 3 + [0, 1, 10**12])),
    Case("import-class-names-not-utf8", ("import-features", "--out", "c2", "--train", "feats.npz", "--test",
                                         "feats.npz", "--class-names", "names.txt"), ("is not UTF-8 text",),
         setup=both(features(), write_file("names.txt", b"cat\ndo\xe9g\nbird\n"))),
    Case("split-file-not-utf8", ("train-backbone", "--dataset", "imagenet-lt", "--root", "imgs", "--split-dir",
                                 "splits", "--out", "r"), ("split file", "is not UTF-8 text"),
         setup=both(write_file("imgs/a.jpg", b"x"),
                    write_file("splits/ImageNet_LT_train.txt", b"a.jpg 0\n\xff\xfe 1\n"))),
    Case("results-string-number", ("report", "cache", "--out", "page"), ("not an ltcache results.json",),
         setup=edit_results(lambda r: r["rows"][0].update(many="<b>12</b>"))),
    Case("results-short-per-class", ("report", "cache", "--out", "page"), ("'per_class' has 2 values for 3 classes",),
         setup=edit_results(lambda r: r["rows"][0].update(per_class=[1.0, 2.0]))),
    Case("results-thresholds-text", ("report", "cache", "--out", "page"), ("'thresholds' must hold integers",),
         setup=edit_results(lambda r: r.update(thresholds={"many": "<i>", "few": 20}))),
    Case("results-n-few-text", ("report", "cache", "--out", "page"), ("'n_few' must be a non-negative integer",),
         setup=edit_results(lambda r: r["rows"][1].update(n_few="<script>"))),
    Case("results-selected-on-number", ("report", "cache", "--out", "page"), ("'selected_on' must be a string",),
         setup=edit_results(lambda r: r.update(selected_on=7))),
    Case("results-not-utf8", ("report", "cache", "--out", "page"), ("is not readable JSON",),
         setup=write_file("cache/reports/results.json", b'{"rows": "\xff"}')),
    Case("results-weight-norms-short", ("report", "cache", "--out", "page"), ("weight_norms['tau_norm'] has 1",),
         setup=edit_results(lambda r: r["weight_norms"].update(tau_norm=[1.0]))),
    Case("report-over-fake-report", ("report", "cache", "--out", "mine", "--overwrite"),
         ("not an ltcache report folder",),
         setup=both(write_file("mine/report.json", json.dumps({"report_version": 1, "sources": []})),
                    write_file("mine/index.html", "<p>my own page</p>"))),
    # ---- debatable cases, decided
    Case("info-verify-unlisted", ("info", "cache", "--verify"), ("notes.txt is in the cache but not in its manifest",),
         setup=write_file("cache/train/notes.txt", "mine\n")),
]


# -------------------------------------------------------------------------------------------- the runner


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """The workspace every case copies: caches compared by real processes from the workspace, relative paths."""
    ws = tmp_path_factory.mktemp("surfaces") / "ws"
    ws.mkdir()
    write_toy_cache(ws / "cache")
    write_toy_cache(ws / "other", seed=1, class_counts=(40, 9, 2), dataset_name="toy-other")
    for args in (("compare", "cache", *TOY), ("compare", "cache", "--out", "results", *TOY),
                 ("compare", "other", *TOY), ("compare", "other", "--out", "other-results", *TOY)):
        done = run_ltcache(args, cwd=ws)
        assert done.returncode == 0, done.stderr
    (ws / "docs").mkdir()
    (ws / "docs" / "notes.txt").write_text("a user's own files\n")
    return ws


@pytest.fixture(scope="session")
def matrix(template, tmp_path_factory) -> dict[str, dict]:
    return run_cases(CASES, lambda ws: shutil.copytree(template, ws, symlinks=True),
                     tmp_path_factory.mktemp("surface-cases"))


def test_the_matrix_covers_the_issue():
    assert len(CASES) >= 35 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_surface(matrix, case):
    outcome = matrix[case.id]
    assert_one_line_error(outcome["result"], case.fragments, case.absent)
    assert outcome["after"] == outcome["before"], "the command changed or left files behind"


# ------------------------------------------------------------------------------- what must succeed instead


def _copy(template: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    return ws


def test_compare_twice_keeps_the_first_comparison_in_history(template, tmp_path):
    ws = _copy(template, tmp_path)
    first = {name: (ws / "cache" / "reports" / name).read_bytes() for name in ("results.md", "index.html",
                                                                              "results.json")}
    heads = {p.name: p.read_bytes() for p in (ws / "cache" / "heads").iterdir()}
    again = run_ltcache(["compare", "cache", "--methods", "crt", "--set", "crt.epochs=1", "--bootstrap", "0"], cwd=ws)
    assert again.returncode == 0, again.stderr
    assert "the earlier comparison there is kept in" in again.stdout
    history = list((ws / "cache" / "history").iterdir())
    assert len(history) == 1
    kept = history[0]
    assert {name: (kept / "reports" / name).read_bytes() for name in first} == first  # byte for byte
    assert {p.name: p.read_bytes() for p in (kept / "heads").iterdir()} == heads
    rows = json.loads((ws / "cache" / "reports" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["crt"]
    assert sorted(p.name for p in (ws / "cache" / "heads").iterdir()) == ["crt.h5"]
    page = run_ltcache(["report", f"cache/history/{kept.name}", "--out", "old-page"], cwd=ws)
    assert page.returncode == 0, page.stderr  # the kept comparison is still a valid, fresh input
    verify = run_ltcache(["info", "cache", "--verify"], cwd=ws)
    assert verify.returncode == 0, verify.stderr  # heads/, reports/ and history/ are compare's, not strays
    assert not [p for p in (ws / "cache").iterdir() if p.name.startswith(".")]


def test_two_compares_into_one_folder_at_once_are_serialised(template, tmp_path):
    ws = _copy(template, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "ltcache", "compare", "cache", "--out", "shared", "--methods",
                              methods, "--bootstrap", "0"], cwd=ws, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for methods in ("joint,ncm", "tau_norm,lws")]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    current = ws / "shared"
    kept = list((current / "history").iterdir())
    assert len(kept) == 1
    for folder in (current, kept[0]):  # each comparison whole: its heads are exactly its rows
        rows = [row["method"] for row in json.loads((folder / "reports" / "results.json").read_text())["rows"]]
        assert sorted(p.stem for p in (folder / "heads").iterdir()) == sorted(rows)
        assert sorted(rows) in (["joint", "ncm"], ["lws", "tau_norm"])
    assert not [p for p in current.iterdir() if p.name.startswith(".compare")]


def test_a_compare_killed_before_publishing_leaves_the_results_as_they_were(template, tmp_path):
    """What a kill between the staging and the publish leaves (a staging folder with half the heads) changes
    nothing a reader sees, and the next compare clears it."""
    ws = _copy(template, tmp_path)
    dead = ws / "cache" / f".compare.staging-{2**22 + 7}"  # no process holds its lock
    (dead / "heads").mkdir(parents=True)
    shutil.copy(ws / "cache" / "heads" / "joint.h5", dead / "heads" / "crt.h5")
    before = checksum(ws / "cache" / "reports")
    page = run_ltcache(["report", "cache", "--out", "page"], cwd=ws)
    assert page.returncode == 0, page.stderr
    assert checksum(ws / "cache" / "reports") == before
    again = run_ltcache(["compare", "cache", *TOY], cwd=ws)
    assert again.returncode == 0, again.stderr
    assert not dead.exists()


def test_compare_and_report_of_folders_named_like_mathtext(template, tmp_path):
    ws = _copy(template, tmp_path)
    strange = r"m$\foo$x"
    shutil.move(ws / "cache", ws / strange)
    done = run_ltcache(["compare", strange, *TOY], cwd=ws)
    assert done.returncode == 0, done.stderr
    page = run_ltcache(["report", strange, "other", "--out", "p$\\bar$"], cwd=ws)
    assert page.returncode == 0, page.stderr
    assert strange in (ws / "p$\\bar$" / "index.html").read_text(encoding="utf-8").replace("&#36;", "$")


def test_a_dead_writers_staging_folder_with_a_reused_pid_does_not_block(template, tmp_path):
    """A staging folder named after PID 1 (always alive) but locked by nobody: the lock, not the PID, decides."""
    ws = _copy(template, tmp_path)
    features()(ws)
    (ws / ".c2.staging-1").mkdir()
    (ws / ".c2.staging-1" / "partial.h5").write_bytes(b"half")
    done = run_ltcache(["import-features", "--out", "c2", "--train", "feats.npz", "--test", "feats.npz"], cwd=ws)
    assert done.returncode == 0, done.stderr
    assert (ws / "c2" / "manifest.json").is_file() and not (ws / ".c2.staging-1").exists()


def test_plugin_by_module_name_says_which_file_it_loaded(template, tmp_path):
    ws = _copy(template, tmp_path)
    plugin("myplugin.py", NAN_HEAD.replace("nanhead", "mine").replace('float("nan")', "1.0"))(ws)
    done = run_ltcache(["methods", "--plugin", "myplugin"], cwd=ws, env={"PYTHONPATH": str(ws)})
    assert done.returncode == 0, done.stderr
    assert f"plugin myplugin: {ws / 'myplugin.py'}" in done.stderr and "mine" in done.stdout


def test_studies_write_only_into_a_folder_they_made(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sampling-weights.md").write_text("my own notes\n")
    before = checksum(tmp_path)
    script = REPO / "experiments" / "studies.py"
    done = subprocess.run([sys.executable, str(script), "sampling-weights", "--recipe",
                           str(REPO / "experiments" / "fashion_mnist_lt.toml"), "--out", str(mine)],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, ("did not make", "ltcache-studies.json"))
    assert checksum(tmp_path) == before
    published = subprocess.run([sys.executable, str(script), "findings", "--out", str(tmp_path / "new"),
                                "--publish", str(mine)], capture_output=True, text=True, timeout=300)
    assert_one_line_error(published, ("--publish", "did not make"))
    assert checksum(tmp_path) == before  # the new --out is not made either: the check comes first


def test_extract_resume_refuses_another_batch_size(tmp_path):
    from ltcache.cache.journal import PLAN, find_interrupted
    from ltcache.core.errors import LtcacheError

    plan = {"checkpoint_sha256": "0" * 64, "model": None, "dtype": "float32", "shard_rows": 64, "train_views": 0,
            "dataset": {"name": "digits-lt"}, "batch_size": 512}
    staging = tmp_path / f".cache.staging-{2**22 + 9}"
    staging.mkdir()
    (staging / PLAN).write_text(json.dumps({**plan, "batch_size": 256}))
    with pytest.raises(LtcacheError, match=r"another batch_size \(256, now 512\)"):
        find_interrupted(tmp_path / "cache", plan)
    (staging / PLAN).write_text(json.dumps(plan))
    assert find_interrupted(tmp_path / "cache", plan) == staging


def test_journal_lines_are_validated_whole():
    from ltcache.cache.journal import journal_entry

    good = {"split": "train", "shard": 3, "file": "train/00003.h5", "rows": 5, "labels": [2, 3],
            "sha256": "a" * 64}
    assert journal_entry(json.dumps(good)) == good
    for bad in ({**good, "file": "../../etc/passwd"}, {**good, "labels": [2, 2]}, {**good, "labels": [-1, 6]},
                {**good, "shard": "3"}, {**good, "sha256": "xyz"}, {**good, "split": "../x"}, [good]):
        assert journal_entry(json.dumps(bad)) is None, bad
    assert journal_entry('{"split": "train", "shard"') is None  # cut short by a kill
