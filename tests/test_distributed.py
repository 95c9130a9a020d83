"""Stage 1 under torchrun: two CPU processes (gloo) train one model; only rank 0 writes."""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist

from ltcache.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def test_torchrun_two_processes_train_and_write_once(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ltcache", "train-backbone",
               "--out", str(out), "--epochs", "2", "--batch-size", "32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checkpoint:") == 1
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and not any(key.startswith("module.") for key in state["model"])
