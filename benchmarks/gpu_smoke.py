"""GPU smoke test: ResNet-50 at 224 px on synthetic images through the whole pipeline.

A few training steps (bf16 autocast, channels_last on CUDA), extraction of a few hundred images into a cache,
then `compare` with the paper's five methods. Prints images/s for training and extraction and the stage-2
wall time as JSON. Never needed by the tests or CI; on a CPU it runs too (use a small --image-size).

    python benchmarks/gpu_smoke.py                       # CUDA when present
    python benchmarks/gpu_smoke.py --device cpu --backbone resnet10 --image-size 32 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ltcache.config import TrainConfig
from ltcache.extract import extract
from ltcache.lab import compare
from ltcache.runtime import resolve_device
from ltcache.train import fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "backbone": args.backbone, "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        run, cache = Path(tmp) / "run", Path(tmp) / "cache"
        cfg = TrainConfig.from_options(out=str(run), dataset="synthetic-lt", image_size=args.image_size,
                                       backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size,
                                       workers=args.workers, device=args.device, compile=args.compile)
        start = time.perf_counter()
        fit(cfg)
        report["train_seconds"] = round(time.perf_counter() - start, 2)
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_images = json.loads((run / "config.json").read_text())["dataset"]["split_rows"]["train"]
        # The last epoch is warm (no cuDNN autotuning, no compilation); its time includes the val pass.
        report["train_images_per_second"] = round(train_images / epochs[-1]["seconds"], 1)
        report["final_loss"] = epochs[-1]["loss"]

        start = time.perf_counter()
        extract(run / "checkpoint.pt", cache, device=args.device, workers=args.workers)
        seconds = time.perf_counter() - start
        rows = sum(entry["rows"] for entry in json.loads((cache / "manifest.json").read_text())["splits"].values())
        report["extract_rows"] = rows
        report["extract_images_per_second"] = round(rows / seconds, 1)

        start = time.perf_counter()
        summary = compare(cache, device=args.device)
        report["stage2_seconds"] = round(time.perf_counter() - start, 2)
        report["test_all"] = {row.method: round(row.evaluation.all, 2) for row in summary.rows}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
