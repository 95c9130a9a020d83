"""Stage 2 at iNaturalist 2018 shape: 437,513 train images x 2,048-d, 8,142 classes, on one machine.

The train logits alone would be 437,513 x 8,142 x 4 B = 14.2 GB; ltcache never holds them (logits.py). Every step
runs in a process of its own, so its time and peak resident memory (VmHWM) are its own:

- opening the cache, NCM, the 21-point tau sweep and logit adjustment, each with its peak memory against the cache
  on disk plus one block of logits (the largest logit matrix the memory budget lets a step hold whole);
- one cRT epoch and one LWS epoch against their matrix-product floor: the same GEMMs at the same shapes (batch 512)
  timed alone, forward and weight gradient for cRT, the forward product alone for LWS (its backward needs none);
- `ltcache compare` with the paper's five, cRT and LWS at one epoch each (stated in the table), with its peak
  memory; the time at the default epochs is extrapolated from the measured epochs and labelled so.

Appends a table to benchmarks/RESULTS.md.

    python benchmarks/inat_shape.py                     # the full shape: about 4 GB of disk, 25 minutes on 2 cores
    python benchmarks/inat_shape.py --scale 0.05 --dim 256   # a quick run of the same code
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from publish import publish

HERE = Path(__file__).resolve()
CLASSES, TRAIN = 8142, 437_513
GROUPS = {"many": 842, "medium": 4076, "few": 3224}  # iNaturalist 2018's Many / Medium / Few class counts


def peak_bytes() -> int:
    """This process's peak resident memory (VmHWM), file-backed pages of the mapped cache included."""
    import resource

    try:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inat_counts(scale: float = 1.0) -> list[int]:
    """iNaturalist 2018's shape: 842 Many classes (1000 -> 101), 4,076 Medium (100 -> 20), 3,224 Few (19 -> 2),
    437,513 images. Medium and Few fall linearly; the Many curve 101 + 899 (1 - x)^p has p solved for the total.
    `scale` < 1 shrinks every class count group (a quick run), keeping the profile; below about 0.02 the groups
    are too small for the head curve to reach the total."""
    from scipy.optimize import brentq

    many, medium, few = (max(2, round(n * scale)) for n in GROUPS.values())
    total = round(TRAIN * scale)
    medium_counts = np.round(np.linspace(100, 20, medium)).astype(int)
    few_counts = np.round(np.linspace(19, 2, few)).astype(int)
    x = np.arange(many) / max(1, many - 1)

    def head(power: float) -> np.ndarray:
        return np.floor(101 + 899 * (1 - x) ** power).astype(int)

    target = total - medium_counts.sum() - few_counts.sum()
    power = brentq(lambda q: head(q).sum() - target, 0.01, 200.0)
    counts = np.concatenate([head(power), medium_counts, few_counts])
    counts[0] += total - counts.sum()
    return counts.tolist()


def write_cache(path: Path, *, scale: float, dim: int, dtype: str, seed: int = 0) -> dict:
    """The cache through ltcache's own writer, one class at a time (memory stays bounded): features with class
    structure (ReLU of a class mean plus unit noise), 3 val and 3 test images per class (iNaturalist's val has 3),
    and a joint head whose norms grow with class size, as a jointly trained one does."""
    import torch

    from ltcache.cache import CacheWriter

    counts = inat_counts(scale)
    classes = len(counts)
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * 0.25
    writer = CacheWriter(path, feature_dim=dim, dtype=dtype)
    for split, per_class in (("train", counts), ("val", [3] * classes), ("test", [3] * classes)):
        out, start = writer.split(split), 0
        for c, n in enumerate(per_class):
            features = means[c] + rng.standard_normal((n, dim), dtype=np.float32)
            np.maximum(features, 0, out=features)
            out.add(features, np.full(n, c), np.arange(start, start + n))
            start += n
        writer.finish_split(out, start)
    sizes = np.asarray(counts, dtype=np.float64)
    scale_rows = (1 + 0.3 * np.log(sizes / sizes.min()))[:, None].astype(np.float32)
    writer.write_joint_head(torch.from_numpy(means * scale_rows),
                            torch.from_numpy((0.5 * np.log(sizes / sizes.sum())).astype(np.float32)))
    writer.commit(dataset={"name": "synthetic-inaturalist-2018", "class_names": [str(c) for c in range(classes)],
                           "train_class_counts": counts}, backbone={"arch": "none"})
    return {"classes": classes, "train": int(sum(counts))}


# ------------------------------------------------------------------------------------------------ child steps


def step(name: str, cache: Path, budget: str | None, device: str = "cpu") -> dict:
    """One measured step, in this (child) process. Returns seconds, peak memory and what the step adds."""
    import torch

    from ltcache.fitting import BALANCED_DEFAULTS, train_on_features
    from ltcache.lab import open_lab
    from ltcache.logits import block_rows, fits, resolve_budget
    from ltcache.stage2 import fit_method
    from ltcache.stage2.methods.retrain import new_linear

    if name in ("crt_epoch", "lws_epoch"):
        import torch._dynamo  # noqa: F401  (a process's first optimizer step imports it: ~1 s, not an epoch's)
    if name == "runtime":  # the baseline: a process with torch and the lab imported, nothing opened
        return {"seconds": 0.0, "open_seconds": 0.0, "block_bytes": 0, "peak": peak_bytes()}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.perf_counter()
    lab = open_lab(cache, memory_budget=budget, device=device)
    opened = time.perf_counter() - start
    data = lab.data
    classes, dim = data.num_classes, data.train.features.shape[1]
    limit = resolve_budget(budget)

    def held(rows: int) -> int:  # bytes of the largest logit matrix a step over `rows` rows holds at once
        return 4 * classes * (rows if fits(rows, classes, limit) else block_rows(classes, limit))

    result: dict = {"open_seconds": opened, "budget": limit}
    start = time.perf_counter()
    if name == "open":
        result["block_bytes"] = 0
    elif name in ("ncm", "tau_norm", "logit_adj"):
        fitted = fit_method(name, data)
        data.clear_cached_logits()  # as compare does before scoring
        evaluation = lab.score(fitted)
        result.update(test_mean_per_class=evaluation.mean_per_class,
                      block_bytes=max(held(len(data.val)), held(len(lab.test))))
    elif name == "floor":
        # The GEMMs of one epoch at batch 512, timed alone over 40 batches and scaled to an epoch's steps.
        batch, steps = 512, math.ceil(len(data.train) / 512)
        features = torch.randn(batch, dim, device=device)
        weight = torch.randn(classes, dim, device=device)
        grad = torch.randn(batch, classes, device=device)
        out, wgrad = torch.empty(batch, classes, device=device), torch.empty(classes, dim, device=device)
        for _ in range(3):
            torch.mm(features, weight.T, out=out)
            torch.mm(grad.T, features, out=wgrad)
        timings = {"forward": 0.0, "weight_grad": 0.0}
        for _ in range(40):
            sync()
            t0 = time.perf_counter()
            torch.mm(features, weight.T, out=out)
            sync()
            t1 = time.perf_counter()
            torch.mm(grad.T, features, out=wgrad)
            sync()
            timings["forward"] += t1 - t0
            timings["weight_grad"] += time.perf_counter() - t1
        result.update(steps=steps, forward_epoch=timings["forward"] / 40 * steps,
                      weight_grad_epoch=timings["weight_grad"] / 40 * steps, block_bytes=0)
    elif name == "crt_epoch":
        defaults = dict(BALANCED_DEFAULTS, min_steps=0)
        train_on_features(new_linear(data), data.train.features, data.train.labels, seed=data.seed, epochs=1,
                          **defaults)
        result["block_bytes"] = 0
    elif name == "lws_epoch":
        fit_method("lws", data, {"epochs": 1, "min_steps": 0})
        result.update(per_batch=not fits(len(data.train), classes, limit), block_bytes=0)
    else:
        raise SystemExit(f"unknown step {name}")
    sync()
    result["seconds"] = time.perf_counter() - start
    result["peak"] = peak_bytes()
    return result


def run_child(name: str, cache: Path, budget: str | None, device: str = "cpu") -> dict:
    command = [sys.executable, str(HERE), "--child", name, "--cache", str(cache), "--device", device]
    if budget:
        command += ["--memory-budget", budget]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    print(f"  {name}: {result}", file=sys.stderr, flush=True)
    return result


def epoch_rows(rows: list, floor: dict, crt: dict, lws: dict) -> None:
    """The rows of the epoch steps: the matrix-product floor, one cRT epoch and one LWS epoch against it."""
    gib = 2**30
    crt_floor = floor["forward_epoch"] + floor["weight_grad_epoch"]
    rows.append(("matrix-product floor of one epoch (batch 512)",
                 f"forward {floor['forward_epoch']:.0f} s, weight gradient {floor['weight_grad_epoch']:.0f} s",
                 f"{floor['steps']} steps, timed on 40 and scaled"))
    rows.append(("one cRT epoch (SGD, batch 512, class-balanced)", f"{crt['seconds']:.0f} s; peak "
                 f"{crt['peak'] / gib:.2f} GiB", f"{crt['seconds'] / crt_floor:.2f}x its floor of "
                 f"{crt_floor:.0f} s (target <= 1.3x)"))
    rows.append(("one LWS epoch (logits per batch from the features)", f"{lws['seconds']:.0f} s; peak "
                 f"{lws['peak'] / gib:.2f} GiB", f"{lws['seconds'] / floor['forward_epoch']:.2f}x its floor of "
                 f"{floor['forward_epoch']:.0f} s (target <= 1.3x)"))


PEAK_REPORTING_CLI = """
import atexit, sys
sys.path.insert(0, {here!r})
from inat_shape import peak_bytes
atexit.register(lambda: print('peak-rss-bytes', peak_bytes(), file=sys.stderr))
sys.argv = ['ltcache'] + sys.argv[1:]
from ltcache.cli import main
main()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the class counts (a quick run)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="memory,epochs,compare",
                        help="which groups to run: memory (open, NCM, tau, LA), epochs (cRT, LWS), compare")
    parser.add_argument("--workdir", type=Path, default=None, help="where the cache is written (default: a temp dir)")
    parser.add_argument("--keep-cache", type=Path, default=None,
                        help="write the cache here and keep it; a later run with the same path reuses it")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE.with_name("RESULTS.md"))
    parser.add_argument("--child", default=None)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step(args.child, args.cache, args.memory_budget, args.device)))
        return

    import torch

    from ltcache.logits import resolve_budget

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cache = args.keep_cache or Path(tmp) / "cache"
        gib = 2**30
        if (cache / "manifest.json").is_file():
            manifest = json.loads((cache / "manifest.json").read_text())
            shape = {"classes": len(manifest["class_names"]), "train": manifest["splits"]["train"]["rows"]}
            written = "reused (written by an earlier run of this script)"
        else:
            start = time.perf_counter()
            shape = write_cache(cache, scale=args.scale, dim=args.dim, dtype=args.dtype)
            written = f"{time.perf_counter() - start:.0f} s"
        disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        rows.append(("write the cache (through CacheWriter)", written, f"{disk / gib:.2f} GiB on disk ({args.dtype})"))
        logits_gib = shape["train"] * shape["classes"] * 4 / gib
        rows.append(("train logits if materialized", f"{logits_gib:.1f} GiB", "never held: the budget is "
                     f"{resolve_budget(args.memory_budget) / gib:.1f} GiB"))

        runtime = run_child("runtime", cache, args.memory_budget, args.device)["peak"]
        rows.append(("a process with torch and ltcache imported, nothing opened", f"peak {runtime / gib:.2f} GiB",
                     "baseline, inside every peak below"))
        groups = set(args.steps.split(","))
        memory_steps = (("open", "open the cache (every file hashed)"), ("ncm", "NCM: fit, choose, score"),
                        ("tau_norm", "tau sweep (21 values on val), then score"),
                        ("logit_adj", "logit adjustment (21 values on val), then score"))
        for name, label in memory_steps if "memory" in groups else ():
            r = run_child(name, cache, args.memory_budget, args.device)
            bound = 1.3 * (disk + r["block_bytes"])
            seconds = r["open_seconds"] if name == "open" else r["seconds"]
            rows.append((label, f"{seconds:.1f} s; peak {r['peak'] / gib:.2f} GiB",
                         f"{r['peak'] / (disk + r['block_bytes']):.2f}x (cache {disk / gib:.2f} GiB + one block "
                         f"{r['block_bytes'] / gib:.2f} GiB; target <= 1.3x, {bound / gib:.2f} GiB)"
                         + (f"; test mean/class {r['test_mean_per_class']:.2f}" if "test_mean_per_class" in r else "")))

        if "epochs" in groups or "compare" in groups:
            floor = run_child("floor", cache, args.memory_budget, args.device)
            crt = run_child("crt_epoch", cache, args.memory_budget, args.device)
            lws = run_child("lws_epoch", cache, args.memory_budget, args.device)
            epoch_rows(rows, floor, crt, lws)

        if "compare" in groups and not args.skip_compare:
            command = [sys.executable, "-c", PEAK_REPORTING_CLI.format(here=str(HERE.parent)), "compare", str(cache),
                       "--bootstrap", "0", "--device", args.device, "--set", "crt.epochs=1", "--set",
                       "lws.epochs=1", "--out", str(Path(tmp) / "compared")]
            if args.memory_budget:
                command += ["--memory-budget", args.memory_budget]
            start = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            compare_s = time.perf_counter() - start
            peak = int(done.stderr.rsplit("peak-rss-bytes ", 1)[1].split()[0])
            results = json.loads((Path(tmp) / "compared" / "reports" / "results.json").read_text())
            accuracy = ", ".join(f"{r['method']} {r['mean_per_class']:.2f}" for r in results["rows"])
            rows.append(("`ltcache compare`, the paper's five, cRT and LWS at 1 epoch, own process",
                         f"{compare_s:.0f} s; peak {peak / gib:.2f} GiB", f"{peak / disk:.2f}x the cache on disk; "
                         f"test mean/class: {accuracy}"))
            extrapolated = compare_s + 9 * crt["seconds"] + 4 * lws["seconds"]
            rows.append(("the same at the default epochs (cRT 10, LWS 5)", f"{extrapolated / 60:.0f} min "
                         "(extrapolated)", "measured compare + 9 more cRT epochs + 4 more LWS epochs, each at the "
                         "measured epoch time"))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    lines = [f"\n## Stage 2 at iNaturalist 2018 shape — {stamp}\n",
             f"{shape['train']} train x {args.dim}-d, {shape['classes']} classes ({shape['classes'] * 3} val, "
             f"{shape['classes'] * 3} test), {args.dtype} cache; {where}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. One run; every step in its own "
             "process, peak = its VmHWM.\n",
             "| step | measured | ratio or target |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {target} |" for what, measured, target in rows]
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("scale", args.scale), ("dim", args.dim),
                                                                 ("dtype", args.dtype),
                                                                 ("memory_budget", args.memory_budget),
                                                                 ("device", args.device), ("steps", args.steps))
                    if v is not None and str(v) not in ("1.0", "2048", "float32", "cpu", "memory,epochs,compare"))
    lines.append(f"\nCommand: `python benchmarks/inat_shape.py{flags}`\n")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
