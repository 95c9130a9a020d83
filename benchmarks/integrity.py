"""What reading a cache safely costs, at ImageNet-LT shape, beside what the work after it costs, in one run.

Every read hashes each file it uses against the manifest's sha256 and checks labels, indices and finiteness
(cache.py). This times opening the lab with and without those checks, each check alone, and sets the difference
against the cheapest real stage-2 work (one train GEMM) and against `ltcache sweep-tau` and `ltcache compare` run
as users run them. Appends a table to benchmarks/RESULTS.md.

    python benchmarks/integrity.py                  # ImageNet-LT shape (about 1.5 GB in a temporary folder)
    python benchmarks/integrity.py --classes 100 --dim 256 --n-max 500 --no-compare   # a quick run
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

from ltcache.cache import FeatureCache
from ltcache.cache import reader as cache_module
from ltcache.core.fsutil import mismatched_files
from ltcache.lab import open_lab

sys.path.insert(0, str(Path(__file__).parent))
from publish import publish
from stage2 import timed, write_cache  # noqa: E402  (the same synthetic ImageNet-LT-shaped cache)


def best_of(repeats: int, fn) -> float:
    return min(timed(fn)[1] for _ in range(repeats))


def unchecked_open(path: Path, device: str):
    """open_lab with the hashes and the finiteness check switched off: the baseline."""
    with mock.patch.object(cache_module, "check_finite", lambda *a, **k: None), \
            mock.patch.object(FeatureCache, "_verify", lambda self, expected: None):
        return open_lab(path, device=device)


def cli_seconds(*args: str) -> float:
    _, seconds = timed(lambda: subprocess.run([sys.executable, "-m", "ltcache", *args], check=True,
                                              capture_output=True))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-max", type=int, default=1280)
    parser.add_argument("--imbalance", type=float, default=256)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compare", action="store_true", help="skip timing `ltcache compare` (about 2 minutes)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        write_cache(path, classes=args.classes, n_max=args.n_max, imbalance=args.imbalance, dim=args.dim, seed=0,
                    separation=0.16)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        cache = FeatureCache(path)
        files = cache.files()
        hashing = best_of(args.repeats, lambda: mismatched_files(path, files))
        train = cache.load_split("train").features.numpy()
        finite = best_of(args.repeats, lambda: cache_module.check_finite(train, "train"))
        unchecked = best_of(args.repeats, lambda: unchecked_open(path, args.device))
        checked = best_of(args.repeats, lambda: open_lab(path, device=args.device))
        lab = open_lab(path, device=args.device)
        gemm = best_of(args.repeats, lambda: lab.data.train.features @ lab.data.joint.weight.T)
        extra = checked - unchecked
        rows += [
            ("sha256 of every file (threads)", f"{hashing:.2f} s", f"{size / 2**30 / hashing:.2f} GiB/s"),
            ("finiteness check of the train features", f"{finite:.2f} s", "block by block, no full-size temporary"),
            ("open the lab without checks", f"{unchecked:.2f} s", "baseline"),
            ("open the lab with every check (the default)", f"{checked:.2f} s",
             f"+{extra:.2f} s; {extra / gemm:.2f}x one train GEMM ({gemm:.2f} s)"),
        ]
        sweep = cli_seconds("sweep-tau", str(path), "--device", args.device)
        rows.append(("`ltcache sweep-tau CACHE` (own process, import included)", f"{sweep:.1f} s",
                     f"the checks are {100 * extra / sweep:.0f}% of it"))
        if not args.no_compare:
            compare = cli_seconds("compare", str(path), "--device", args.device, "--bootstrap", "0")
            rows.append(("`ltcache compare CACHE --bootstrap 0` (own process)", f"{compare:.1f} s",
                         f"the checks are {100 * extra / compare:.1f}% of it"))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## Integrity checks on every read — {stamp}\n",
             f"{args.classes} classes x {args.dim}-d, {size / 2**30:.2f} GiB on disk; CPU ({platform.machine()}), "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Best of {args.repeats}.\n",
             "| step | measured | ratio |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {ratio} |" for what, measured, ratio in rows]
    lines.append(f"\nCommand: `python benchmarks/integrity.py --classes {args.classes} --n-max {args.n_max} "
                 f"--imbalance {args.imbalance:g} --dim {args.dim} --device {args.device}"
                 f"{' --no-compare' if args.no_compare else ''}`\n")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
