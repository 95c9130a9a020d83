"""Benchmark: the tau sweep and LWS over cached logits vs. redoing the matrix product per tau / per step.

Shapes default to ImageNet-LT's val split with a ResNeXt-50: 20,000 x 2048 features, 1,000 classes, the
21-value tau grid. Both paths are timed in the same process and their ratio is reported; the script also
checks that both give identical predictions. Results are appended to benchmarks/RESULTS.md.

    python benchmarks/bench_tau_sweep.py [--rows 20000 --dim 2048 --classes 1000]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from publish import publish

from ltcache.heads import LinearHead
from ltcache.stage2.methods.weight_norms import DEFAULT_TAUS, tau_normalize, weight_norms


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.rows, args.dim, generator=generator).relu()
    weight = torch.randn(args.classes, args.dim, generator=generator) * torch.linspace(2, 0.2, args.classes)[:, None]
    taus = DEFAULT_TAUS

    def naive_sweep():  # one GEMM per tau, as a per-tau evaluation loop would do
        return [LinearHead(tau_normalize(weight, tau)).predict(features) for tau in taus]

    def cached_sweep():  # ltcache: one GEMM, then a column rescaling per tau
        raw = LinearHead(weight).logits(features)
        norms = weight_norms(weight)
        return [(raw / norms.pow(tau)).argmax(1) for tau in taus]

    mismatches = sum(int((a != b).sum()) for a, b in zip(naive_sweep(), cached_sweep(), strict=True))
    naive = best_of(args.repeats, naive_sweep)
    cached = best_of(args.repeats, cached_sweep)

    batch = features[:512]
    scales = torch.ones(args.classes, requires_grad=True)
    raw_batch = batch @ weight.T

    def lws_step_gemm():  # (f * W) applied to features every step
        (batch @ (weight * scales[:, None]).T).sum().backward()

    def lws_step_cached():  # ltcache: scales applied to cached logits
        (raw_batch * scales).sum().backward()

    lws_gemm = best_of(args.repeats * 10, lws_step_gemm)
    lws_cached = best_of(args.repeats * 10, lws_step_cached)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## tau sweep and LWS over cached logits — {stamp}\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU. "
        f"Shapes: {args.rows} x {args.dim} features, {args.classes} classes, {len(taus)} tau values. "
        f"Best of {args.repeats} (LWS: best of {args.repeats * 10} steps).\n",
        "| what | redo the GEMM | ltcache (cached logits) | speed-up |",
        "|---|---:|---:|---:|",
        f"| full tau sweep ({len(taus)} values) | {naive:.3f} s | {cached:.3f} s | {naive / cached:.1f}x |",
        f"| one LWS step (batch 512, fwd + bwd) | {lws_gemm * 1e3:.2f} ms | {lws_cached * 1e3:.3f} ms | "
        f"{lws_gemm / lws_cached:.0f}x |",
        f"\nPredictions differing between the two sweep paths: {mismatches} of {args.rows * len(taus)}.",
        "Command: `python benchmarks/bench_tau_sweep.py`\n",
    ]
    text = "\n".join(lines)
    publish([text], args.results)


if __name__ == "__main__":
    main()
