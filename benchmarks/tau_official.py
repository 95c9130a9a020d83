"""ltcache sweep-tau against the official tau sweep script, as whole processes, A B A B (issue 23).

The official script is classifier-balancing's tau_norm.py (facebookresearch/classifier-balancing): it loads the
train and test features from pickles and the classifier from a checkpoint, and prints Many / Medium / Few / mean
per-class accuracy on test for each of 21 taus (0 to 2), recomputing the test logits for each. It is fetched at run
time, never copied into this repository: pass `--official PATH` (a checkout of the repository, or its git directory),
or the script tries `git clone` from GitHub, and skips with the reason when neither gives it.

From one ImageNet-LT-shape cache (benchmarks/stage2.py's: 115,846 train x 2,048-d, 1,000 classes, 20 val and 50
test per class) it writes the official inputs (trainfeat_all.pkl, testfeat_all.pkl, final_model_checkpoint.pth),
then times, in turn, `python tau_norm.py --root DIR` and `ltcache sweep-tau CACHE --select val` (float32, and
`--precision bf16`), each twice. It checks that ltcache's test row at its chosen tau equals the official line for
that tau (their shot groups are the same: Many > 100, Few < 20 train images). Appends a table to RESULTS.md.

    python benchmarks/tau_official.py --official /path/to/classifier-balancing
    python benchmarks/tau_official.py --official DIR --classes 100 --dim 256   # a quick run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from publish import publish

OFFICIAL_FILES = ("tau_norm.py", "utils.py")
REPOSITORY = "https://github.com/facebookresearch/classifier-balancing"


def official_script(source: str | None, into: Path) -> str | None:
    """Put tau_norm.py and utils.py into `into`; returns why not, or None when they are there."""
    into.mkdir(parents=True, exist_ok=True)
    if source is None:
        clone = into.parent / "classifier-balancing"
        try:
            subprocess.run(["git", "clone", "--depth", "1", "-q", REPOSITORY, str(clone)], check=True,
                           capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the official repository could not be cloned from {REPOSITORY} ({type(exc).__name__}); pass " \
                   "--official PATH to a checkout"
        source = str(clone)
    path = Path(source)
    for name in OFFICIAL_FILES:
        if (path / name).is_file():
            shutil.copy(path / name, into / name)
            continue
        shown = subprocess.run(["git", "--git-dir", str(path / ".git" if (path / ".git").exists() else path),
                                "show", f"HEAD:{name}"], capture_output=True)
        if shown.returncode != 0:
            return f"{path} holds no {name} (neither as a file nor in its git history)"
        (into / name).write_bytes(shown.stdout)
    return None


def official_inputs(cache: Path, root: Path) -> None:
    """The official script's inputs from the cache: pickles of {'feats', 'labels'} and the classifier as the
    official checkpoint holds it."""
    import torch

    from ltcache.cache import FeatureCache

    reader = FeatureCache(cache)
    for split, name in (("train", "trainfeat_all.pkl"), ("test", "testfeat_all.pkl")):
        features, labels = reader.read_split(split)
        with open(root / name, "wb") as f:
            pickle.dump({"feats": np.ascontiguousarray(features), "labels": labels}, f, protocol=4)
    weight, bias = reader.joint_head()
    torch.save({"state_dict_best": {"classifier": {"module.fc.weight": weight, "module.fc.bias": bias}}},
               root / "final_model_checkpoint.pth")


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="a checkout of facebookresearch/classifier-balancing, or "
                        "its git directory (default: git clone from GitHub)")
    parser.add_argument("--cache", type=Path, default=None, help="an existing cache to use instead of writing one")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (each command runs this many times)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        why = official_script(args.official, tmp / "official")
        if why is not None:
            print(f"skipped: {why}")
            return
        cache = args.cache
        if cache is None:
            from stage2 import write_cache

            cache = tmp / "cache"
            write_cache(cache, classes=args.classes, n_max=1280, imbalance=256, dim=args.dim, seed=0,
                        separation=0.16)
        root = tmp / "root"
        root.mkdir()
        official_inputs(cache, root)
        commands = {
            "official tau_norm.py": ([sys.executable, "tau_norm.py", "--root", str(root)], tmp / "official"),
            "ltcache sweep-tau (float32)": ([sys.executable, "-m", "ltcache", "sweep-tau", str(cache), "--select",
                                             "val", "--json"], tmp),
            "ltcache sweep-tau --precision bf16": ([sys.executable, "-m", "ltcache", "sweep-tau", str(cache),
                                                    "--select", "val", "--json", "--precision", "bf16"], tmp),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        outputs: dict[str, str] = {}
        for _ in range(args.rounds):  # A B A B: the machine's drift falls on every command alike
            for name, (command, cwd) in commands.items():
                seconds, outputs[name] = timed(command, cwd)
                times[name].append(seconds)
                print(f"{name}: {seconds:.2f} s", flush=True)

    official = [line.split() for line in outputs["official tau_norm.py"].splitlines() if line.strip()]
    official = [[float(value) for value in line] for line in official if len(line) == 4]
    taus = [round(float(t), 1) for t in np.linspace(0, 2, 21)]
    lines = [f"\n## ltcache sweep-tau against the official tau_norm.py — "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n",
             f"{args.classes} classes x {args.dim}-d (ImageNet-LT shape when 1000 x 2048: 115,846 train, 20,000 val, "
             f"50,000 test); {platform.machine()}, {os.cpu_count()} CPUs. Whole processes, run in turn "
             f"{args.rounds} times each (A B A B).\n",
             "| command | runs | mean | against the official |", "|---|---|---:|---:|"]
    base = float(np.mean(times["official tau_norm.py"]))
    for name, values in times.items():
        mean = float(np.mean(values))
        lines.append(f"| {name} | {', '.join(f'{v:.2f} s' for v in values)} | {mean:.2f} s | "
                     f"{base / mean:.1f}x faster |" if name != "official tau_norm.py" else
                     f"| {name} | {', '.join(f'{v:.2f} s' for v in values)} | {mean:.2f} s | 1x |")
    for name in ("ltcache sweep-tau (float32)", "ltcache sweep-tau --precision bf16"):
        result = json.loads(outputs[name])
        tau, test = result["best_tau"], result["test"]
        line = official[taus.index(tau)] if len(official) == len(taus) else None
        ours = [test["many"], test["medium"], test["few"], test["mean_per_class"]]
        agrees = line is not None and all(abs(a - b) < 0.006 for a, b in zip(ours, line, strict=True))
        lines.append(f"\n{name}: chosen tau {tau:g} on val; test Many / Medium / Few / mean per class "
                     f"{' / '.join(f'{v:.2f}' for v in ours)}; the official line for tau {tau:g}: "
                     f"{' / '.join(f'{v:.2f}' for v in line) if line else 'missing'} "
                     f"({'the same' if agrees else 'DIFFERENT'}).")
    lines.append(f"\nCommand: `python benchmarks/tau_official.py --official PATH"
                 f"{'' if args.classes == 1000 else f' --classes {args.classes}'}"
                 f"{'' if args.dim == 2048 else f' --dim {args.dim}'}`\n")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
