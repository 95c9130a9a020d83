"""A hyperparameter grid trained in one pass against the same grid fitted point by point (issue 23).

At ImageNet-LT shape (115,846 train x 2,048-d, 1,000 classes; `--shape inat` for iNaturalist 2018's 437,513 x
2,048, 8,142 classes, `--scale` to shrink it), for cRT and for LWS: K = 1, 4, 8, 16 points of an lr x weight-decay
grid, each K timed as one pass (ltcache's compare path: stage2.training.fit_points) and as K fits alone
(Lab.fit, train_on_features), the heads of the two checked equal, and cRT against its matrix-product floor: the
forward and weight-gradient products of one head at the same shapes, timed alone on 40 batches and scaled to the
fit's steps; the grid's floor is K times that. LWS trains on cached logits and has no product per step: its
one-pass grid is reported against K fits of it alone, the product F @ W.T it shares included.

The features live in memory (no cache is written: this times training, not reading). Appends its table to
benchmarks/RESULTS.md.

    python benchmarks/grid.py                          # ImageNet-LT shape, 1 epoch per fit: about 8 minutes on 2 cores
    python benchmarks/grid.py --classes 100 --dim 256 --sizes 1,4   # a quick run of the same code
    python benchmarks/grid.py --device cuda --epochs 10             # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from publish import publish

from ltcache.cache import Split
from ltcache.heads import LinearHead
from ltcache.stage2 import LabData
from ltcache.stage2.core import resolve_params, run_fit
from ltcache.stage2.training import fit_points

LRS = (0.2, 0.1, 0.4, 0.05)
DECAYS = (5e-4, 1e-3, 2e-3, 5e-3)
GRID_OF = {1: (1, 1), 4: (2, 2), 8: (4, 2), 16: (4, 4)}  # K -> (lrs, weight decays)


def imagenet_lt_counts() -> list[int]:
    """ImageNet-LT's 1,000 class counts (1,280 -> 5, 115,846 images), as benchmarks/stage2.py builds them."""
    from stage2 import imagenet_lt_counts as counts

    return counts()


def make_data(counts: list[int], dim: int, device: str, seed: int = 0, test_per_class: int = 0) -> LabData:
    """Features with class structure (ReLU of a class mean plus unit noise), 20 val rows per class, and a joint
    head whose norms grow with the class size, as a jointly trained one's do; with `test_per_class`, also a test
    split (LabData.test, an attribute the lab never has: a benchmark scores it)."""
    classes = len(counts)
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator) * 0.15

    def split(per_class: list[int]) -> Split:
        labels = torch.repeat_interleave(torch.arange(classes), torch.tensor(per_class))
        features = torch.empty(len(labels), dim)
        for start in range(0, len(labels), 65536):  # in blocks: no second full-size temporary
            block = labels[start : start + 65536]
            features[start : start + len(block)] = (means[block] + torch.randn(len(block), dim,
                                                                               generator=generator)).clamp_min_(0)
        return Split(features.to(device), labels.to(device))

    scale = 1 + 0.3 * torch.log(torch.tensor(counts, dtype=torch.float32) / min(counts))
    joint = LinearHead((means * scale[:, None]).to(device), (0.5 * torch.log(torch.tensor(counts) / sum(counts))
                                                               ).float().to(device))
    data = LabData(split(counts), split([20] * classes), joint, np.asarray(counts))
    data.test = split([test_per_class] * classes) if test_per_class else None
    return data


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_seconds(data: LabData, batch: int, steps: int, device: str) -> float:
    """The matrix products of one cRT head over `steps` batches: forward [B, d] x [d, C] and weight gradient
    [C, B] x [B, d], timed alone on 40 batches (after 5 to warm up) and scaled."""
    features = data.train.features
    weight = torch.randn(data.num_classes, features.shape[1], device=device)
    batch_rows = features[:batch].clone()
    logits = torch.empty(batch, data.num_classes, device=device)
    wgrad = torch.empty_like(weight)
    for i in range(45):
        if i == 5:
            sync(device)
            start = time.perf_counter()
        torch.mm(batch_rows, weight.T, out=logits)
        torch.mm(logits.T, batch_rows, out=wgrad)
    sync(device)
    return (time.perf_counter() - start) / 40 * steps


def grid_points(method: str, k: int, epochs: int) -> list[dict]:
    lrs, decays = GRID_OF[k]
    return [resolve_params(method, {"epochs": epochs, "min_steps": 0, "lr": lr, "weight_decay": decay})
            for lr in LRS[:lrs] for decay in DECAYS[:decays]]


def measure(method: str, data: LabData, k: int, epochs: int, device: str) -> dict:
    """One pass over the K-point grid, then each point alone; seconds and the largest head difference."""
    points = grid_points(method, k, epochs)
    data.clear_cached_logits()
    sync(device)
    start = time.perf_counter()
    together = fit_points(method, [(data, params) for params in points])
    sync(device)
    one_pass = time.perf_counter() - start
    data.clear_cached_logits()
    start = time.perf_counter()
    alone = []
    for params in points:
        alone.append(run_fit(method, data, params))
        data.clear_cached_logits()  # as compare's point-by-point loop did: each fit computes what it needs
    sync(device)
    serial = time.perf_counter() - start
    difference = max(float((a.head.weight - b.head.weight).abs().max()) for a, b in zip(together, alone, strict=True))
    scale = max(float(b.head.weight.abs().max()) for b in alone)
    return {"k": k, "one_pass": one_pass, "serial": serial, "difference": difference, "scale": scale}


def shape_counts(shape: str, scale: float = 1.0, classes: int | None = None) -> list[int]:
    """The class counts of `shape` (imagenet-lt, or inat shrunk by `scale`), or ImageNet-LT's cut to `classes`."""
    if shape == "inat":
        from inat_shape import inat_counts

        return inat_counts(scale)
    counts = imagenet_lt_counts()
    return counts[:: max(1, len(counts) // classes)][:classes] if classes else counts


def measure_grids(data: LabData, *, sizes: list[int], methods: list[str], epochs: int, device: str,
                  batch: int = 512) -> tuple[float, list[tuple[str, dict]]]:
    """cRT's matrix-product floor of one fit, and every (method, K) measured (measure), after a warm-up."""
    steps = epochs * -(-len(data.train) // batch)
    floor = floor_seconds(data, batch, steps, device)
    for method in methods:  # warm up: a process's first optimizer step and vmap import their code
        warm = resolve_params(method, {"epochs": 1, "min_steps": 0, "batch_size": batch})
        fit_points(method, [(data, warm), (data, {**warm, "lr": 0.01})])
        run_fit(method, data, warm)
    rows = []
    for method in methods:
        for k in sizes:
            result = measure(method, data, k, epochs, device)
            rows.append((method, result))
            print(method, result, file=sys.stderr, flush=True)  # stdout stays the table (gpu_smoke: its JSON)
    return floor, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("imagenet-lt", "inat"), default="imagenet-lt")
    parser.add_argument("--scale", type=float, default=1.0, help="iNaturalist shape only: shrink every class count")
    parser.add_argument("--classes", type=int, default=None, help="a quick shape: this many classes, ImageNet-LT's "
                        "profile cut to them")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every fit (cRT's default is 10; the ratios "
                        "are per epoch)")
    parser.add_argument("--sizes", default="1,4,8,16")
    parser.add_argument("--methods", default="crt,lws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    counts = shape_counts(args.shape, args.scale, args.classes)
    data = make_data(counts, args.dim, args.device)
    batch = 512
    steps = args.epochs * -(-len(data.train) // batch)
    floor, rows = measure_grids(data, sizes=[int(k) for k in args.sizes.split(",")],
                                methods=args.methods.split(","), epochs=args.epochs, device=args.device, batch=batch)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    lines = [f"\n## A grid in one pass against point by point ({args.shape}) — {stamp}\n",
             f"{len(data.train):,} train x {args.dim}-d, {len(counts):,} classes; {device}, {torch.get_num_threads()} "
             f"torch threads, torch {torch.__version__}. Every fit: {args.epochs} epoch(s) of batch {batch} "
             f"({steps} steps), lr x weight-decay grid. cRT's matrix-product floor of one fit: {floor:.2f} s.\n",
             "| method | K | one pass | K fits alone | alone / one pass | one pass / (K x floor) | largest head "
             "difference |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in rows:
        against_floor = f"{r['one_pass'] / (r['k'] * floor):.2f}x" if method == "crt" else "no product per step"
        lines.append(f"| {method} | {r['k']} | {r['one_pass']:.2f} s | {r['serial']:.2f} s | "
                     f"{r['serial'] / r['one_pass']:.2f}x | {against_floor} | {r['difference']:.1e} (of "
                     f"{r['scale']:.2f}) |")
    command = "python benchmarks/grid.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items()
        if key != "results" and value != parser.get_default(key))
    lines.append(f"\nCommand: `{command}`\n")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
