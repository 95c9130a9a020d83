"""extract resumes after SIGKILL: a real subprocess killed mid-extraction, then `extract --resume` (in one process or
two torchrun processes) gives the same cache as an uninterrupted run, shard for shard (sha256), and a half-written
shard is never listed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import assert_one_line_error, checksum, run_ltcache

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FASHION.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
EXTRACT = ["--shard-rows", "256", "--batch-size", "100"]


@pytest.fixture(scope="module")
def fashion_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fashion")
    result = run_ltcache(["train-backbone", "--dataset", "fashion-mnist-lt", "--backbone", "smallresnet8", "--epochs",
                          "1", "--out", folder / "run"], cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run" / "checkpoint.pt"


def shards(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())["splits"]


def kill_mid_extraction(checkpoint: Path, out: Path, *, at_least: int = 5) -> None:
    """Start extract, SIGKILL it once `at_least` shards are journalled (a real process, no clean-up of its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ltcache", "extract", str(checkpoint), "--out", str(out),
                                *EXTRACT], cwd=out.parent, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        journals = list(out.parent.glob(f".{out.name}.staging-*/journal-r*.jsonl"))
        if journals and sum(len(j.read_text().splitlines()) for j in journals) >= at_least:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "extract finished before it could be killed"
    assert not out.exists()  # nothing published


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(fashion_checkpoint, tmp_path):
    whole = run_ltcache(["extract", fashion_checkpoint, "--out", tmp_path / "whole", *EXTRACT], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cache"
    kill_mid_extraction(fashion_checkpoint, out)
    staging = next(tmp_path.glob(".cache.staging-*"))
    journal = next(staging.glob("journal-r*.jsonl"))
    kept = len(journal.read_text().splitlines())
    (staging / "train").mkdir(exist_ok=True)
    (staging / "train" / "00010.h5").write_bytes(b"half a shard")  # not journalled, as if killed mid-write
    before = checksum(tmp_path)
    assert_one_line_error(run_ltcache(["extract", fashion_checkpoint, "--out", out, "--resume", "--shard-rows",
                                       "128"], cwd=tmp_path), ["another shard_rows"])
    assert checksum(tmp_path) == before  # the interrupted extract is left as it was, still resumable
    whole_before = checksum(tmp_path / "whole")
    resumed = run_ltcache(["extract", fashion_checkpoint, "--out", out, "--resume", *EXTRACT], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kept >= 5 and "kept from the interrupted run" in resumed.stderr
    assert shards(out) == shards(tmp_path / "whole")  # every shard: same file, rows and sha256
    assert not list(out.glob("journal-*")) and not (out / "extract.json").exists()
    assert not list(tmp_path.glob(".cache.staging-*"))
    assert checksum(tmp_path / "whole") == whole_before
    before = checksum(tmp_path)
    assert_one_line_error(run_ltcache(["extract", fashion_checkpoint, "--out", tmp_path / "other", "--resume",
                                       *EXTRACT], cwd=tmp_path), ["no interrupted extract"])
    assert checksum(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_resume_under_another_process_count(fashion_checkpoint, tmp_path):
    out = tmp_path / "cache"
    kill_mid_extraction(fashion_checkpoint, out, at_least=8)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ltcache", "extract", str(fashion_checkpoint), "--out", str(out), "--resume", *EXTRACT]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run_ltcache(["extract", fashion_checkpoint, "--out", tmp_path / "whole", *EXTRACT], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert shards(out) == shards(tmp_path / "whole")
