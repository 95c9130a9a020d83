"""The terminal and the logs (issue 22): train-backbone's epoch lines and in-epoch bar, extract's bars, the library's
messages through `logging`, TensorBoard events read back with TensorBoard's own reader, discovery (`ltcache list`,
help that says where the choices are, suggestions for unknown names, effective defaults, a run folder or a manifest
where a checkpoint or a cache is expected), and errors spelled for the interface that raised them."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_clean_error, assert_one_line_error, invoke, run_ltcache, write_toy_cache
from ltcache.core.errors import LtcacheError
from ltcache.lab import compare


def _in_a_terminal(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """What `ltcache ARGS` writes to a pseudo-terminal (stdout and stderr both), as a user sees it."""
    leader, follower = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "COLUMNS": "120"}
    process = subprocess.Popen([sys.executable, "-m", "ltcache", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            process.kill()
            raise TimeoutError(f"ltcache {' '.join(args)} printed nothing for {timeout} s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=timeout) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


EPOCH_LINE = re.compile(r"epoch (\d+)/2  \d+\.\d s  [\d,]+ images/s  loss \d\.\d{4}  lr \S+  val top-1 \d+\.\d\d  "
                        r"mean/class \d+\.\d\d  \d+ s left")


@pytest.mark.slow
def test_train_and_extract_show_bars_and_epoch_lines_in_a_terminal(tmp_path):
    shown = _in_a_terminal(["train-backbone", "--dataset", "digits-lt", "--epochs", "2", "--out", "run"], tmp_path)
    lines = shown.replace("\r\n", "\n").split("\n")
    assert [int(m.group(1)) for line in lines if (m := EPOCH_LINE.search(line))] == [1, 2], shown
    bars = [line for line in shown.split("\r") if line.startswith("epoch 1  [")]
    assert bars and re.search(r"\[#{20}\]  314/314 images  [\d,]+ images/s  0 s left", bars[-1]), shown
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["images_per_second"] > 0 for m in metrics)  # the line's throughput is kept in metrics.jsonl too

    shown = _in_a_terminal(["extract", "run", "--out", "cache"], tmp_path)  # a run folder, not its checkpoint.pt
    for split, rows in (("train", 314), ("val", 200), ("test", 400)):
        assert re.search(rf"extract {split}  \[#{{20}}\]  {rows}/{rows} images  [\d,]+ images/s  0 s left", shown)
        assert re.search(rf"extracted {split}: {rows} rows x 64 in \d+\.\d s", shown)
    # into a log file the same lines come without a bar: tests/test_cli_errors.py (progress, not a terminal)


def test_the_epoch_line_says_what_the_epoch_took_and_did_and_the_time_left(tmp_path):
    """train-backbone's line per epoch (the terminal test, marked slow, sees it in a real pseudo-terminal)."""
    from ltcache.stage1.train import EpochEvents, epoch_line

    record = {"epoch": 3, "seconds": 12.24, "images_per_second": 1234.5, "loss": 0.51149, "lr": 0.0225,
              "val_top1": 63.0, "val_mean_per_class": 61.25}
    assert epoch_line(record, 40, left=130.0) == ("epoch 3/40  12.2 s  1,234 images/s  loss 0.5115  lr 0.0225  "
                                                  "val top-1 63.00  mean/class 61.25  2 min 10 s left")
    no_val = {key: value for key, value in record.items() if not key.startswith("val")}
    assert epoch_line(no_val, 3, left=0).endswith("lr 0.0225  0 s left")
    events = EpochEvents(enabled=False, steps=10)  # not asked for: no writer, no callback, nothing written
    assert events.step_callback(0) is None
    events.epoch(record, tmp_path)
    assert events.writer is None and not events.pending and list(tmp_path.iterdir()) == []


def test_library_messages_go_through_logging_and_a_script_that_configures_nothing_sees_none(tmp_path, caplog,
                                                                                           capsys):
    cache = write_toy_cache(tmp_path / "toy")
    with caplog.at_level(logging.INFO, logger="ltcache"):
        compare(cache, methods=["joint", "ncm"], bootstrap=0, write_reports=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "ltcache"]
    assert messages[:2] == ["[1/2] joint: fitting", messages[1]] and messages[1].startswith("[1/2] joint: done in")
    caplog.clear()
    logging.getLogger("ltcache").setLevel(logging.WARNING)  # silenced, as a notebook would
    try:
        compare(cache, methods=["joint"], bootstrap=0, write_reports=False)
    finally:
        logging.getLogger("ltcache").setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name == "ltcache"]
    assert "joint: fitting" not in capsys.readouterr().err
    done = run_ltcache(["compare", cache, "--methods", "joint", "--bootstrap", "0"], cwd=tmp_path)
    assert done.returncode == 0 and "[1/1] joint: fitting" in done.stderr  # the command line shows them as before


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


@pytest.mark.slow
def test_train_backbone_tensorboard_events_read_back_with_tensorboards_reader(tmp_path):
    done = run_ltcache(["train-backbone", "--dataset", "digits-lt", "--epochs", "2", "--out", "run", "--tensorboard"],
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = _events(tmp_path / "run" / "tensorboard")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/loss", "loss"), ("val/top1", "val_top1"), ("train/images_per_second",
                                                                         "images_per_second")):
        assert [(e.step, round(e.value, 3)) for e in events.Scalars(tag)] == [
            (m["epoch"], round(m[key], 3)) for m in metrics], tag
    steps = events.Scalars("train/loss_step")
    assert [e.step for e in steps] == list(range(1, len(steps) + 1)) and len(steps) % 2 == 0  # both epochs' steps
    assert events.Scalars("train/lr")[0].value == pytest.approx(metrics[0]["lr"], rel=0.2)


def test_compare_tensorboard_writes_each_row_as_hparams_and_each_trained_heads_loss(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    cache = write_toy_cache(tmp_path / "toy")
    comparison = compare(cache, methods=["joint", "crt"], params={"crt": {"min_steps": 20}}, bootstrap=0,
                         out=tmp_path / "results", tensorboard=True)
    rows = {row["method"]: row for row in json.loads((tmp_path / "results" / "reports" / "results.json")
                                                      .read_text())["rows"]}
    assert rows["crt"]["loss_curve"] == comparison.row("crt").losses and len(rows["crt"]["loss_curve"]) == 10
    assert "loss_curve" not in rows["joint"]  # nothing was trained
    top = _events(tmp_path / "results" / "tensorboard")
    assert [round(e.value, 5) for e in top.Scalars("loss/crt")] == [round(v, 5) for v in rows["crt"]["loss_curve"]]
    for method in ("joint", "crt"):
        run = _events(tmp_path / "results" / "tensorboard" / method)
        assert run.Scalars("test/mean_per_class")[0].value == pytest.approx(rows[method]["mean_per_class"])
        start = plugin_data_pb2.HParamsPluginData.FromString(
            run.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["method"].string_value == method
    assert start.hparams["lr"].number_value == pytest.approx(rows["crt"]["chosen"]["lr"])


@pytest.mark.slow
def test_tensorboard_without_the_package_is_a_one_line_error_naming_the_extra(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "tensorboard.py").write_text("raise ImportError('not installed here')\n")
    cache = write_toy_cache(tmp_path / "toy")
    before = sorted(p.name for p in cache.iterdir())
    env = {"PYTHONPATH": str(blocker)}
    for args in (["compare", cache, "--methods", "joint", "--tensorboard"],
                 ["train-backbone", "--epochs", "1", "--out", tmp_path / "run", "--tensorboard"]):
        assert_one_line_error(run_ltcache(args, cwd=tmp_path, env=env), ["pip install 'ltcache[tensorboard]'"])
    assert sorted(p.name for p in cache.iterdir()) == before and not (tmp_path / "run").exists()


def test_discovery_lists_choices_suggests_names_and_shows_effective_defaults(tmp_path):
    top = invoke("--help").output
    for summary in ("Stage 1: train a backbone and its linear classifier with a sampling strategy (CE, SGD, cosine",
                    "List the registered datasets, stage-1 samplers, losses and backbones"):
        assert summary in " ".join(top.split()), top  # the whole first sentence, not cut at 45 characters
    help_text = " ".join(invoke("train-backbone", "--help").output.split())
    for kind in ("datasets", "samplers", "losses", "backbones"):
        assert f"ltcache list {kind} shows them" in help_text
    listing = json.loads(invoke("list", "--json").stdout)
    names = {kind: {entry["name"] for entry in entries} for kind, entries in listing.items()}
    assert {"digits-lt", "fashion-mnist-lt", "imagenet-lt"} <= names["datasets"]
    assert {"instance", "class", "sqrt", "progressive", "class-aware"} == names["samplers"]
    assert {"ce", "ldam", "balanced_softmax"} <= names["losses"] and {"smallresnet8", "resnet50"} <= names["backbones"]
    assert all(entry["summary"] for entries in listing.values() for entry in entries)
    assert invoke("list", "samplers").stdout.startswith("samplers:\n  instance ")
    assert_clean_error(invoke("list", "mehtods"), "kind", "datasets, samplers")
    for args, hint in ((["--dataset", "fashon-mnist-lt"], "did you mean fashion-mnist-lt?"),
                       (["--sampler", "progresive"], "did you mean progressive?"),
                       (["--loss", "ldma"], "did you mean ldam?")):
        assert_clean_error(invoke("train-backbone", *args, "--out", tmp_path / "x"), hint)
    assert not (tmp_path / "x").exists()
    methods = invoke("methods").stdout
    assert "lr=0.2 x batch_size / 512" in methods and "lr=None" not in methods
    crt = {m["method"]: m for m in json.loads(invoke("methods", "--json").stdout)}["crt"]
    assert crt["hyperparameters"]["lr"]["effective_default"] == "0.2 x batch_size / 512"


def test_a_run_folder_is_a_checkpoint_and_a_manifest_is_its_cache(digits_run, tmp_path):
    from ltcache.lab import info
    from ltcache.stage1.extract import run_checkpoint

    run = digits_run["run"]
    assert run_checkpoint(run) == run_checkpoint(run / "checkpoint.pt") == run / "checkpoint.pt"
    manifest = digits_run["cache"] / "manifest.json"
    assert info(manifest) == info(digits_run["cache"])
    done = invoke("info", manifest, "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["splits"] == info(digits_run["cache"])["splits"]
    assert_clean_error(invoke("extract", tmp_path, "--out", tmp_path / "c2"), "is a folder without a checkpoint.pt",
                       "train-backbone run folder")
    assert not (tmp_path / "c2").exists()


def test_errors_name_the_options_of_the_interface_that_raised_them(tmp_path):
    import ltcache

    cache = write_toy_cache(tmp_path / "toy")
    compare(cache, methods=["joint"], bootstrap=0)
    ltcache.build_report([cache], tmp_path / "page")
    with pytest.raises(LtcacheError) as raised:  # from Python: the keyword argument
        ltcache.build_report([cache], tmp_path / "page")
    assert "overwrite=True" in str(raised.value) and "--overwrite" not in str(raised.value)
    assert invoke("report", cache, "--out", tmp_path / "page2").exit_code == 0
    again = invoke("report", cache, "--out", tmp_path / "page2")  # the command line: the flag
    assert_clean_error(again, "--overwrite")
    assert "overwrite=True" not in again.output
    with pytest.raises(LtcacheError, match=r"^trainable='layer9' names no parameter"):
        from ltcache.stage1.models import build_model, select_trainable

        select_trainable(build_model("smallresnet8", 3, 1), "layer9")
