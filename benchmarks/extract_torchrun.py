"""Extraction throughput: one process against N torchrun processes (gloo on the CPU, or NCCL on GPUs), in one run.

Trains a 1-epoch backbone on synthetic-lt (seeded RGB noise at --image-size), then extracts the same checkpoint
once with one process and once under `torchrun --nproc_per_node N`, each timed as a whole command (process start,
torch import and dataset building included), and checks that both caches read back the same rows. On a CPU every
process gets cores / N intra-op threads, so the ratio says what splitting buys beyond torch's own threading.
Appends a table to RESULTS.md.

    python benchmarks/extract_torchrun.py --nproc 2 --n-max 400 --image-size 96
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def timed(command: list[str], env: dict) -> float:
    begin = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-max", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-rows", type=int, default=1024, help="ranks take whole shards: keep shards < rows / N")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    import torch

    from ltcache.cache import FeatureCache

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        common = ["--dataset", "synthetic-lt", "--n-max", str(args.n_max), "--image-size", str(args.image_size)]
        timed([sys.executable, "-m", "ltcache", "train-backbone", *common, "--backbone", args.backbone, "--epochs",
               "1", "--batch-size", "32", "--device", args.device, "--out", str(folder / "run")], env)
        checkpoint = str(folder / "run" / "checkpoint.pt")
        one = timed([sys.executable, "-m", "ltcache", "extract", checkpoint, "--out", str(folder / "one"),
                     "--device", args.device, "--batch-size", "64", "--shard-rows", str(args.shard_rows)],
                    {**env, "OMP_NUM_THREADS": str(cores)})
        many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                      str(args.nproc), "-m", "ltcache", "extract", checkpoint, "--out", str(folder / "many"),
                      "--device", args.device, "--batch-size", "64", "--shard-rows", str(args.shard_rows)],
                     {**env, "OMP_NUM_THREADS": str(max(1, cores // args.nproc))})
        a, b = FeatureCache(folder / "one"), FeatureCache(folder / "many")
        rows = {split: len(a.load_split(split)) for split in ("train", "val", "test")}
        same = all(torch.allclose(a.load_split(s).features, b.load_split(s).features, atol=1e-4) for s in rows)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## Extraction, one process against torchrun ({when})\n",
             f"`python benchmarks/extract_torchrun.py --nproc {args.nproc} --n-max {args.n_max} --image-size "
             f"{args.image_size} --shard-rows {args.shard_rows}`: {args.backbone} on synthetic-lt "
             f"({sum(rows.values())} images at "
             f"{args.image_size} px: {rows}), device {args.device}, {cores} cores; each command timed whole "
             "(start-up, torch import and dataset included). Same features in both caches: "
             f"{'yes' if same else 'NO'} (atol 1e-4).\n",
             "| extract | processes | intra-op threads each | wall s | speed-up |", "|---|---:|---:|---:|---:|",
             f"| one process | 1 | {cores} | {one:.1f} | 1.00x |",
             f"| torchrun | {args.nproc} | {max(1, cores // args.nproc)} | {many:.1f} | {one / many:.2f}x |"]
    text = "\n".join(lines) + "\n"
    print(text)
    with args.results.open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
