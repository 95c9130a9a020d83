"""GPU smoke test: ResNet-50 at 224 px on synthetic images through the whole pipeline.

A few training steps (bf16 autocast, channels_last on CUDA), extraction of a few hundred images into a cache,
then `compare` with the paper's five methods. Prints images/s for training and extraction and the stage-2
wall time as JSON. Never needed by the tests or CI; on a CPU it runs too (use a small --image-size).

    python benchmarks/gpu_smoke.py                       # CUDA when present
    python benchmarks/gpu_smoke.py --torchrun 0          # also extract and compare under torchrun, one rank per GPU
    python benchmarks/gpu_smoke.py --device cpu --backbone resnet10 --image-size 32 --epochs 1

The torchrun mode (`--torchrun N`, 0: one process per visible GPU) runs `torchrun --standalone --nproc_per_node N
-m ltcache extract` and `... compare` on the same checkpoint and cache, times them whole (launch included) beside
the single process, and checks that the torchrun cache holds the same features and that compare reaches the same
accuracy. With one GPU it exercises the launcher and the CUDA paths under torchrun, not NCCL's collectives (which
need two GPUs: NCCL refuses two ranks on one device).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ltcache.core.runtime import resolve_device
from ltcache.lab import compare
from ltcache.stage1.config import TrainConfig
from ltcache.stage1.extract import extract
from ltcache.stage1.train import fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--torchrun", type=int, default=None, help="processes for the torchrun mode (0: one per GPU)")
    parser.add_argument("--grid-shape", choices=("imagenet-lt", "inat", "none"), default="inat",
                        help="also time a K = 1, 4, 16 grid of cRT and LWS in one pass against point by point "
                        "(benchmarks/grid.py) at this shape")
    parser.add_argument("--grid-scale", type=float, default=1.0, help="iNaturalist grid shape: shrink the counts")
    parser.add_argument("--grid-dim", type=int, default=2048)
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
        if args.torchrun is not None:
            report["torchrun"] = torchrun_mode(args, device, run, cache, Path(tmp), summary)
    if args.grid_shape != "none":
        report["grid"] = grid_mode(args.grid_shape, device, args.grid_scale, args.grid_dim)
    print(json.dumps(report, indent=2))


def grid_mode(shape: str, device, scale: float, dim: int) -> dict:
    """benchmarks/grid.py on this device: one epoch per fit, K = 1, 4 and 16, cRT against its product floor."""
    sys.path.insert(0, str(Path(__file__).parent))
    import grid

    data = grid.make_data(grid.shape_counts(shape, scale), dim, str(device))
    floor, rows = grid.measure_grids(data, sizes=[1, 4, 16], methods=["crt", "lws"], epochs=1, device=str(device))
    return {"shape": shape, "crt_floor_seconds": round(floor, 3),
            "rows": [{"method": method, **{key: round(value, 4) if isinstance(value, float) else value
                                           for key, value in result.items()},
                      "one_pass_over_k_floors": round(result["one_pass"] / (result["k"] * floor), 3)}
                     for method, result in rows]}


def torchrun_mode(args, device, run: Path, cache: Path, tmp: Path, single) -> dict:
    """extract and compare under torchrun, timed whole against the single process, checked against it."""
    from ltcache.cache import FeatureCache

    nproc = args.torchrun or (torch.cuda.device_count() if device.type == "cuda" else 2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
              "ltcache"]
    device_flag = ["--device", "cuda"] if device.type == "cuda" else ["--device", "cpu"]
    result: dict = {"processes": nproc}

    def timed_run(command: list[str]) -> float:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return time.perf_counter() - start

    one_s = timed_run([sys.executable, "-m", "ltcache", "extract", str(run / "checkpoint.pt"), "--out",
                       str(tmp / "one"), "--workers", str(args.workers), *device_flag])
    many_s = timed_run([*launch, "extract", str(run / "checkpoint.pt"), "--out", str(tmp / "many"), "--workers",
                        str(args.workers), *device_flag])
    a, b = FeatureCache(tmp / "one"), FeatureCache(tmp / "many")
    result["extract_seconds"] = {"one_process": round(one_s, 2), "torchrun": round(many_s, 2),
                                 "speed_up": round(one_s / many_s, 3)}
    result["extract_same_features"] = all(
        torch.equal(a.load_split(s).labels, b.load_split(s).labels)
        and torch.allclose(a.load_split(s).features.float(), b.load_split(s).features.float(), atol=1e-3)
        for s in ("train", "val", "test"))
    compare_s = timed_run([*launch, "compare", str(cache), "--out", str(tmp / "compared"), "--bootstrap", "0",
                           *device_flag])
    rows = json.loads((tmp / "compared" / "reports" / "results.json").read_text())["rows"]
    result["compare_seconds"] = round(compare_s, 2)
    result["compare_test_all"] = {row["method"]: round(row["all"], 2) for row in rows}
    result["compare_max_difference"] = round(max(abs(row["all"] - single.row(row["method"]).evaluation.all)
                                                 for row in rows), 3)
    return result


if __name__ == "__main__":
    main()
