"""`ltcache matrix`: every backbone x dataset pair extracted and compared in one command, killed and resumed (finished
pairs skipped, a killed extract continued), one report with CLIP_benchmark-style rows, and its hostile inputs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_file_datasets import write_split_tree
from test_frontier_extract import TINY_DINOV2

from conftest import TINY_CLIP, assert_clean_error, checksum, invoke


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "tiny-dinov2.json").write_text(json.dumps(TINY_DINOV2))
    (tmp_path / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    write_split_tree(tmp_path / "inet", [12, 6, 3])
    return tmp_path


def matrix_args(ws, out):
    return ["matrix", "--backbones", f"timm:{ws / 'tiny-dinov2.json'},open_clip:{ws / 'tiny-clip.json'}",
            "--datasets", "digits-lt,imagenet-lt", "--root", f"imagenet-lt={ws / 'inet'}", "--features",
            "cls_patch,both",
            "--zero-shot", "--templates", "simple", "--test-crops", "2", "--tta", "--methods",
            "joint,crt,knn,zero_shot", "--set", "crt.min_steps=20", "--bootstrap", "0", "--shard-rows", "16",
            "--out", str(out)]


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ltcache", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # 27 s: four pairs through real subprocesses; the default run keeps a matrix run end to end below
def test_the_matrix_is_killed_inside_an_extract_and_resumed(workspace):
    out = workspace / "mx"
    first = workspace / "mx" / "caches" / "digits-lt--timm-tiny-dinov2"
    second = workspace / "mx" / "caches"
    process = run(matrix_args(workspace, out), workspace)
    deadline = time.monotonic() + 240
    killed_in = None
    while time.monotonic() < deadline and process.poll() is None:
        staging = [p for p in second.glob(".digits-lt--open_clip-tiny-clip.staging-*")] if second.is_dir() else []
        journals = [j for s in staging for j in s.glob("journal-r*.jsonl") if j.stat().st_size > 0]
        if (first / "reports" / "results.json").is_file() and journals:
            process.send_signal(signal.SIGKILL)  # the second pair's extract has finished at least one shard
            killed_in = staging[0]
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert killed_in is not None, "the matrix ended before it could be killed inside the second pair's extract"
    done = (first / "reports" / "results.json").read_bytes()
    state = json.loads((out / "matrix.json").read_text())
    assert state["pairs"]["digits-lt--open_clip-tiny-clip"]["state"] == "extracting"
    resumed = run(matrix_args(workspace, out), workspace)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "[1/4] digits-lt x timm:" in stderr and "done earlier, skipped" in stderr
    assert "continuing the killed extract" in stderr and "kept from the interrupted run" in stderr
    assert (first / "reports" / "results.json").read_bytes() == done  # the finished pair was not redone
    state = json.loads((out / "matrix.json").read_text())
    assert {pair["state"] for pair in state["pairs"].values()} == {"compared"} and len(state["pairs"]) == 4
    rows = list(csv.DictReader((out / "report" / "clip_benchmark.csv").open()))
    assert {(r["dataset"], r["model"]) for r in rows} == {(d, m) for d in ("digits-lt", "imagenet-lt")
                                                         for m in ("vit_small_patch14_reg4_dinov2", "tiny-clip")}
    tasks = {(r["model"], r["task"]) for r in rows}
    assert ("tiny-clip", "zeroshot_classification") in tasks and ("tiny-clip", "linear_probe") in tasks
    assert ("vit_small_patch14_reg4_dinov2", "zeroshot_classification") not in tasks  # no text head: it sat out
    assert any(r["method"] == "crt (2 crops)" for r in rows)  # the test-time ensemble rows
    for r in rows:
        assert 0.0 <= float(r["acc1"]) <= 1.0 and r["pretrained"] == "random"
    assert "report: " in stdout and (out / "report" / "index.html").is_file()
    from ltcache.cache import FeatureCache

    kinds = {name: FeatureCache(out / "caches" / name).manifest["backbone"]["model"]["features"]["kind"]
             for name in state["pairs"]}
    assert kinds == {"digits-lt--timm-tiny-dinov2": "cls_patch", "digits-lt--open_clip-tiny-clip": "both",
                     "imagenet-lt--timm-tiny-dinov2": "cls_patch", "imagenet-lt--open_clip-tiny-clip": "both"}
    # once more: every pair is skipped, and the report is rebuilt from the same results
    again = invoke(*matrix_args(workspace, out))
    assert again.exit_code == 0, again.output
    assert again.stderr.count("done earlier, skipped") == 4


def test_bad_matrix_inputs_are_one_line_errors_and_write_nothing(workspace):
    (workspace / "busy").mkdir()
    (workspace / "busy" / "notes.txt").write_text("mine")
    for name, text in (("torn", '{"format": "ltcache-matrix/1", "pai'), ("alien", '{"format": "other", "pairs": {}}')):
        (workspace / name).mkdir()
        (workspace / name / "matrix.json").write_text(text)
    before = checksum(workspace)
    clip = f"open_clip:{workspace / 'tiny-clip.json'}"
    base = ["matrix", "--datasets", "digits-lt", "--out", workspace / "new"]
    cases = [
        (["--backbones", f"{clip},{clip}"], "names 'open_clip:"),
        (["--backbones", " , "], "--backbones names nothing"),
        (["--backbones", clip, "--root", "digits-lt"], "must look like DATASET=PATH"),
        (["--backbones", clip, "--root", "imagenet-lt=/x"], "not among --datasets"),
        (["--backbones", clip, "--tta"], "--tta needs --test-crops"),
        (["--backbones", clip, "--features", "cls_patch,nonsense"], "--features 'nonsense' is not one of"),
        (["--backbones", "timm:test_resnett"], "unknown timm model"),
        (["--backbones", clip, "--set", "crt.lr"], "METHOD.PARAM=VALUE"),
    ]
    for extra, message in cases:
        assert_clean_error(invoke(*base, *extra), message)
    assert_clean_error(invoke("matrix", "--backbones", clip, "--datasets", "digits-lt", "--out", workspace / "busy"),
                       "holds no ltcache matrix")
    assert_clean_error(invoke("matrix", "--backbones", clip, "--datasets", "nosuch", "--out", workspace / "new2"),
                       "nosuch")
    for name, message in (("torn", "is not readable JSON"), ("alien", "is not an ltcache matrix file")):
        assert_clean_error(invoke("matrix", "--backbones", clip, "--datasets", "digits-lt", "--out", workspace / name),
                           message)
    assert checksum(workspace) == before and not (workspace / "new").exists()


def test_a_matrix_refuses_to_resume_with_other_options(workspace):
    out = workspace / "mx"
    clip = f"open_clip:{workspace / 'tiny-clip.json'}"
    first = invoke("matrix", "--backbones", clip, "--datasets", "digits-lt", "--methods", "joint", "--bootstrap", "0",
                   "--out", out)
    assert first.exit_code == 0, first.output
    before = checksum(out)
    assert_clean_error(invoke("matrix", "--backbones", clip, "--datasets", "digits-lt", "--methods", "joint,ncm",
                              "--bootstrap", "0", "--out", out), "with other extract or compare options")
    assert checksum(out) == before
