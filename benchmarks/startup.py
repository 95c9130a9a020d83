"""Start-up cost of the commands that need no tensors, measured as whole processes in one run.

Each command runs as its own process, as a user types it; "with torch" runs the same command after an
`import torch`, which is what every command paid before stage 2 stopped importing stage 1 and torch at start-up.
With --before REV, the same commands also run on that git revision (checked out into a temporary worktree and put
first on PYTHONPATH), the code as it was. Wall time is the median of --repeats runs, peak memory the process's
VmHWM. Appends a table to RESULTS.md.

    python benchmarks/startup.py --before d63fcae
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Runs the ltcache CLI (optionally after importing torch) and prints its own peak resident memory.
RUNNER = """
import atexit, sys
def report():
    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    print('peak-rss-bytes', int(line.split()[1]) * 1024, file=sys.stderr)
atexit.register(report)
if sys.argv[1] == 'torch':
    import torch  # noqa: F401
sys.argv = ['ltcache'] + sys.argv[2:]
from ltcache.cli import main
main()
"""


def run(args: list[str], *, torch_first: bool, src: Path | None = None) -> tuple[float, int, int, bool]:
    """(seconds, peak bytes, exit code, torch imported) of one whole process (ltcache from `src` if given)."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else None
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", RUNNER, "torch" if torch_first else "-",
                             *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("peak-rss-bytes"))
    torch = any(line.rsplit("|", 1)[-1].strip() == "torch" for line in result.stderr.splitlines() if "|" in line)
    return seconds, peak, result.returncode, torch


def bare_torch() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def median_run(args: list[str], *, torch_first: bool, repeats: int,
               src: Path | None = None) -> tuple[float, int, int, bool]:
    runs = [run(args, torch_first=torch_first, src=src) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[0][2], any(r[3] for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="a git revision to measure too (e.g. the commit before a change)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import write_toy_cache

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(write_toy_cache(Path(tmp) / "cache"))
        before = None
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
        torch_alone = statistics.median(bare_torch() for _ in range(args.repeats))
        commands = [["--help"], ["methods"], ["info", cache], ["compare", cache, "--bootstrap", "-1"],
                    ["compare", cache, "--methods", "nope"], ["sweep-tau", cache, "--taus", "0:1e9:1e-9"],
                    ["train-backbone", "--out", str(Path(tmp) / "run"), "--dataset", "nope"],
                    ["train-backbone", "--out", str(Path(tmp) / "run"), "--loss", "focal", "--loss-param", "beta=0.9"]]
        rows = []
        for command in commands:
            without = median_run(command, torch_first=False, repeats=args.repeats)
            with_torch = median_run(command, torch_first=True, repeats=args.repeats)
            old = median_run(command, torch_first=False, repeats=args.repeats, src=before / "src") if before else None
            rows.append((command, without, with_torch, old))
        if before:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(before)], check=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## Start-up of the commands that need no tensors — {when}\n",
             f"Whole processes, median of {args.repeats} runs each, peak resident memory (VmHWM); a bare "
             f"`python -c \"import torch\"` takes {torch_alone:.2f} s here. \"with torch\" is the same command run "
             "after `import torch`, what every command paid at start-up before.\n",
             "| command | exit | wall | peak memory | torch imported | with torch | its peak memory | ratio |"
             + (f" at {args.before} | its peak memory | torch imported there |" if before else ""),
             "|---|---:|---:|---:|:---:|---:|---:|---:|" + ("---:|---:|:---:|" if before else "")]
    for command, (seconds, peak, code, torch), (t_seconds, t_peak, _, _), old in rows:
        shown = " ".join(c if not c.startswith("/") else ("RUN" if c.endswith("run") else "CACHE") for c in command)
        line = (f"| `ltcache {shown}` | {code} | {seconds:.2f} s | {peak / 2**20:.0f} MiB | "
                f"{'yes' if torch else 'no'} | {t_seconds:.2f} s | {t_peak / 2**20:.0f} MiB | "
                f"{t_seconds / seconds:.1f}x |")
        if old:
            line += f" {old[0]:.2f} s | {old[1] / 2**20:.0f} MiB | {'yes' if old[3] else 'no'} |"
        lines.append(line)
    lines.append(f"\nCommand: `python benchmarks/startup.py{' --before ' + args.before if before else ''}`\n")
    text = "\n".join(lines)
    print(text)
    with args.results.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
