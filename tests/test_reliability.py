"""Kills, races, resumes and full disks, with real processes: nothing is lost, nothing is silently wrong."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, checksum, run_ltcache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def start(args, *, cwd: Path) -> subprocess.Popen:
    """An ltcache process in its own process group (so a SIGKILL takes its workers too)."""
    return subprocess.Popen([sys.executable, "-m", "ltcache", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, *, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended early (rc {process.returncode}): {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the process, its group and everything it started."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def staging(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.staging-*"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for key in states_a:
        assert torch.equal(states_a[key]["momentum_buffer"], states_b[key]["momentum_buffer"]), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


TRAIN = ("--epochs", "6", "--backbone", "smallresnet14", "--batch-size", "64")


@pytest.mark.slow
def test_resume_after_sigkill_mid_run_equals_an_uninterrupted_run(tmp_path):
    whole = run_ltcache(["train-backbone", "--out", "whole", *TRAIN], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = start(["train-backbone", "--out", "killed", *TRAIN], cwd=tmp_path)
    wait_for(lambda: (tmp_path / "killed" / "checkpoint.pt").is_file(), process=killed)
    time.sleep(0.2)  # into the next epoch
    kill(killed)
    stopped_at = load(tmp_path / "killed" / "checkpoint.pt")["epoch"]
    assert stopped_at < 6, "the run finished before the kill; the test did not interrupt it"

    resumed = run_ltcache(["train-backbone", "--resume", "killed"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"epochs {stopped_at + 1}-6" in resumed.stderr
    assert_same_checkpoint(load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "killed" / "checkpoint.pt"))
    assert losses(tmp_path / "whole") == losses(tmp_path / "killed")  # the metrics log has each epoch once
    assert not staging(tmp_path, "killed")


@pytest.mark.slow
def test_overwrite_killed_before_its_first_checkpoint_keeps_the_old_run(digits_run, tmp_path):
    shutil.copytree(digits_run["run"], tmp_path / "run")
    before = checksum(tmp_path / "run")
    # --overwrite takes a run of the same source only: the demo's dataset and backbone (digits-lt, smallresnet8)
    same_source = ("--epochs", "6", "--batch-size", "64")
    process = start(["train-backbone", "--out", "run", "--overwrite", *same_source], cwd=tmp_path)
    wait_for(lambda: bool(staging(tmp_path, "run")), process=process)
    kill(process)
    assert checksum(tmp_path / "run") == before
    assert not (staging(tmp_path, "run")[0] / "checkpoint.pt").exists()  # it was killed before its checkpoint

    fresh = start(["train-backbone", "--out", "new", *TRAIN], cwd=tmp_path)
    wait_for(lambda: bool(staging(tmp_path, "new")), process=fresh)
    kill(fresh)
    assert not (tmp_path / "new").exists()  # a killed new run leaves no folder at its path

    again = run_ltcache(["train-backbone", "--out", "run", "--overwrite", "--epochs", "1"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert not staging(tmp_path, "run")  # the dead process's staging folder was cleared


@pytest.mark.slow
def test_a_second_writer_to_the_same_path_is_refused(digits_run, tmp_path):
    checkpoint = digits_run["run"] / "checkpoint.pt"
    first = start(["extract", checkpoint, "--out", "cache", "--train-views", "2"], cwd=tmp_path)
    wait_for(lambda: bool(staging(tmp_path, "cache")), process=first)
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first writer mid-extraction
    try:
        second = run_ltcache(["extract", checkpoint, "--out", "cache"], cwd=tmp_path)
        assert_one_line_error(second, ["another ltcache process is already writing cache folder cache"])
        trained = run_ltcache(["train-backbone", "--out", "cache", "--overwrite"], cwd=tmp_path)
        assert_one_line_error(trained, ["already writing"])
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    from ltcache.cache import FeatureCache

    assert FeatureCache(tmp_path / "cache").verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def _mapped(pid: int, path: Path) -> bool:
    try:
        return str(path) in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches /proc/PID/maps")
def test_compare_racing_extract_overwrite_writes_nothing_into_the_new_cache(digits_run, tmp_path):
    shutil.copytree(digits_run["cache"], tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache" / "heads")
    shutil.rmtree(tmp_path / "cache" / "reports")
    compare = start(["compare", "cache", "--methods", "joint,crt", "--bootstrap", "0"], cwd=tmp_path)
    test_shard = (tmp_path / "cache" / "test" / "00000.h5").resolve()
    wait_for(lambda: _mapped(compare.pid, test_shard), process=compare)  # every split loaded
    os.killpg(compare.pid, signal.SIGSTOP)
    try:
        swap = run_ltcache(["extract", digits_run["run"] / "checkpoint.pt", "--out", "cache", "--overwrite"],
                           cwd=tmp_path)
        assert swap.returncode == 0, swap.stderr[-2000:]
        swapped = checksum(tmp_path / "cache")
    finally:
        os.killpg(compare.pid, signal.SIGCONT)
    out, err = compare.communicate(timeout=300)
    result = subprocess.CompletedProcess(compare.args, compare.returncode, out, err)
    assert_one_line_error(result, ["was replaced by another ltcache process while compare ran", "nothing was written"])
    assert checksum(tmp_path / "cache") == swapped  # no head or report from the old features in the new cache


@pytest.mark.slow
def test_extract_killed_mid_overwrite_keeps_the_old_cache_and_the_next_run_cleans_up(digits_run, tmp_path):
    shutil.copytree(digits_run["cache"], tmp_path / "cache")
    before = checksum(tmp_path / "cache")
    checkpoint = digits_run["run"] / "checkpoint.pt"
    process = start(["extract", checkpoint, "--out", "cache", "--overwrite", "--train-views", "3"], cwd=tmp_path)
    wait_for(lambda: any(staging(tmp_path, "cache")[0].glob("*/00000.h5")) if staging(tmp_path, "cache") else False,
             process=process)
    kill(process)
    assert checksum(tmp_path / "cache") == before
    assert staging(tmp_path, "cache")  # what the killed process left
    again = run_ltcache(["extract", checkpoint, "--out", "cache", "--overwrite"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_swap_interrupted_between_its_renames_is_restored(digits_run, tmp_path):
    """Where the kernel cannot exchange two folders, a swap is two renames; a crash between them leaves the new
    cache complete in its staging folder and the old one retired. The next reader puts the new one in place."""
    pid = _dead_pid()
    shutil.copytree(digits_run["cache"], tmp_path / f".cache.staging-{pid}")
    shutil.copytree(digits_run["cache"], tmp_path / f".cache.retired-{pid}")
    result = run_ltcache(["info", "cache", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "restored cache folder cache" in result.stderr
    assert json.loads(result.stdout)["splits"]["train"] == 314
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a whole extract under a file-size limit: CI runs it (.ci/run)
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit on this system")
def test_a_write_the_disk_refuses_is_one_line_and_leaves_nothing(digits_run, tmp_path):
    (tmp_path / "keep.txt").write_text("precious\n")
    before = checksum(tmp_path)
    result = run_ltcache(["extract", digits_run["run"] / "checkpoint.pt", "--out", "cache"], cwd=tmp_path,
                         preexec_fn=_limit_file_size(40_000))
    assert_one_line_error(result, ["cannot write", "File too large"])
    assert checksum(tmp_path) == before


def mount_tmpfs(mount: Path, size: str):
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    return mount


@pytest.fixture
def small_tmpfs(tmp_path):
    yield mount_tmpfs(tmp_path / "small", "600k")
    subprocess.run(["umount", "-l", str(tmp_path / "small")], capture_output=True)


@pytest.fixture
def read_only_cache(digits_run, tmp_path):
    mount = mount_tmpfs(tmp_path / "ro", "64m")
    shutil.copytree(digits_run["cache"], mount / "cache")
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True)
    if remounted.returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        pytest.skip("cannot remount read-only here")
    yield mount / "cache"
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow  # writes and fills a disk image: CI runs it (.ci/run)
def test_a_full_disk_is_one_line_and_leaves_nothing(digits_run, small_tmpfs):
    before = checksum(small_tmpfs)
    result = run_ltcache(["extract", digits_run["run"] / "checkpoint.pt", "--out", small_tmpfs / "cache",
                          "--train-views", "4"], cwd=small_tmpfs.parent)
    assert_one_line_error(result, ["cannot write", "No space left on device"])
    assert checksum(small_tmpfs) == before
    (small_tmpfs / "filler").write_bytes(b"\0" * 560_000)  # too little room left for a checkpoint (torch.save)
    before = checksum(small_tmpfs)
    result = run_ltcache(["train-backbone", "--out", small_tmpfs / "run", "--epochs", "1"], cwd=small_tmpfs.parent)
    assert_one_line_error(result, ["cannot write", "checkpoint.pt", "No space left on device"])
    assert checksum(small_tmpfs) == before


def test_a_read_only_cache_names_out_and_compare_writes_there(read_only_cache, tmp_path):
    refused = run_ltcache(["compare", read_only_cache, "--methods", "joint,ncm"], cwd=tmp_path)
    assert_one_line_error(refused, ["is not writable", "--out DIR"])
    elsewhere = run_ltcache(["compare", read_only_cache, "--methods", "joint,ncm", "--bootstrap", "0",
                             "--out", "results"], cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    assert sorted(p.stem for p in (tmp_path / "results" / "heads").iterdir()) == ["joint", "ncm"]
    summary = json.loads((tmp_path / "results" / "reports" / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["joint", "ncm"] and summary["cache_generation"]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
@pytest.mark.slow
def test_torchrun_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ltcache", "train-backbone", *args]

    options = ("--epochs", "5", "--batch-size", "32", "--backbone", "smallresnet14")
    whole = subprocess.run(torchrun("--out", "whole", *options), cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.Popen(torchrun("--out", "killed", *options), cwd=tmp_path, env=ENV, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "killed" / "checkpoint.pt").is_file(), process=killed)
    kill(killed)
    assert load(tmp_path / "killed" / "checkpoint.pt")["epoch"] < 5
    resumed = subprocess.run(torchrun("--resume", "killed"), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_checkpoint(load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "killed" / "checkpoint.pt"))
    assert len(load(tmp_path / "killed" / "checkpoint.pt")["rng"]) == 2  # both ranks' random states
