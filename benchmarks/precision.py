"""float32 against bf16 products for the trained stage-2 heads (`--precision bf16`, issue 23): speed and accuracy.

- At ImageNet-LT shape (the in-memory features of benchmarks/grid.py, 50 test rows per class): cRT, LWS and the
  cosine classifier fitted once in each precision (one epoch each by default, the ratio is per epoch), with their
  times and test mean per-class accuracy.
- On real caches (`--caches`, e.g. the fashion-mnist-lt study caches): every trained method compared with
  --seeds N in each precision; the bf16 mean beside float32's mean and 95% t-interval over the seeds, and whether it
  falls inside. bf16 would become the default only if every method stayed inside.

Appends its tables to benchmarks/RESULTS.md.

    python benchmarks/precision.py --caches /work/studies/fm20/caches/instance-seed0
    python benchmarks/precision.py --classes 100 --dim 256 --caches   # a quick run of the same code
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from publish import publish

from ltcache.heads import Head
from ltcache.lab import open_lab
from ltcache.metrics import group_accuracy
from ltcache.stage2.core import resolve_params, run_fit

SHAPE_METHODS = ("crt", "lws", "cos")
TRAINED = ("crt", "crt_bsm", "crt_las", "crt_maxnorm", "cos", "lws", "tau_learned", "disalign", "mlp2")


def mean_per_class(head: Head, features: torch.Tensor, labels: torch.Tensor, counts) -> float:
    return group_accuracy(head.predict(features), labels, counts).mean_per_class


def shape_rows(args) -> list[str]:
    import grid

    counts = grid.imagenet_lt_counts()
    if args.classes:
        counts = counts[:: max(1, len(counts) // args.classes)][: args.classes]
    data = grid.make_data(counts, args.dim, "cpu", test_per_class=50)
    lines = [f"\nAt ImageNet-LT shape ({len(data.train):,} train x {args.dim}-d, {len(counts):,} classes, 50 test "
             f"per class; {args.epochs} epoch(s) per fit):\n",
             "| method | float32 | bf16 | speed-up | test mean/class float32 | bf16 | change |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method in SHAPE_METHODS:
        params = resolve_params(method, {"epochs": args.epochs, "min_steps": 0})
        results = {}
        for precision in ("float32", "bf16", "float32", "bf16"):  # A B A B: the second of each is kept
            chosen = replace(data, precision=precision, _raw_logits={})
            start = time.perf_counter()
            fitted = run_fit(method, chosen, params)
            results[precision] = (time.perf_counter() - start,
                                  mean_per_class(fitted.head, data.test.features, data.test.labels, counts))
        (f32_s, f32_acc), (bf_s, bf_acc) = results["float32"], results["bf16"]
        lines.append(f"| {method} | {f32_s:.2f} s | {bf_s:.2f} s | {f32_s / bf_s:.2f}x | {f32_acc:.2f} | "
                     f"{bf_acc:.2f} | {bf_acc - f32_acc:+.2f} |")
        print(lines[-1], flush=True)
    return lines


def cache_rows(cache: Path, seeds: int) -> tuple[list[str], bool]:
    rows, inside_all = {}, True
    for precision in ("float32", "bf16"):
        lab = open_lab(cache, device="cpu", precision=precision)
        start = time.perf_counter()
        comparison = lab.compare(list(TRAINED), bootstrap=0, seeds=seeds)
        rows[precision] = (comparison, time.perf_counter() - start)
    lines = [f"\n`{cache}` ({seeds} seeds; compare of the trained methods took {rows['float32'][1]:.1f} s in float32, "
             f"{rows['bf16'][1]:.1f} s in bf16):\n",
             "| method | float32 mean/class (95% interval over seeds) | bf16 mean/class | inside |",
             "|---|---:|---:|---|"]
    for method in TRAINED:
        exact = rows["float32"][0].row(method).seeds["mean_per_class"]
        rounded = rows["bf16"][0].row(method).seeds["mean_per_class"]
        low, high = exact["ci95"]
        inside = low <= rounded["mean"] <= high
        inside_all &= inside
        lines.append(f"| {method} | {exact['mean']:.2f} ({low:.2f} to {high:.2f}) | {rounded['mean']:.2f} | "
                     f"{'yes' if inside else 'no'} |")
    return lines, inside_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--caches", type=Path, nargs="*", default=[])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    lines = [f"\n## float32 against bf16 products — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n",
             f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, native "
             f"bf16: {torch.backends.cpu.get_cpu_capability()}. Every score is float32; bf16 rounds the training "
             "products' operands (float32 weights, gradients and loss)."]
    lines += shape_rows(args)
    verdicts = []
    for cache in args.caches:
        table, inside = cache_rows(cache, args.seeds)
        lines += table
        verdicts.append(inside)
    if verdicts:
        lines.append(f"\nEvery method's bf16 mean inside its float32 seed interval on every cache: "
                     f"{'yes' if all(verdicts) else 'no'}.")
    command = "python benchmarks/precision.py" + (f" --classes {args.classes}" if args.classes else "") + \
        (f" --dim {args.dim}" if args.dim != 2048 else "") + (f" --epochs {args.epochs}" if args.epochs != 1 else "") \
        + "".join(f" --caches {c}" for c in args.caches[:1]) + "".join(f" {c}" for c in args.caches[1:])
    lines.append(f"\nCommand: `{command}`\n")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
