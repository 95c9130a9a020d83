"""What every benchmark does with its table: print it and append it to benchmarks/RESULTS.md (made with its header
when missing). The scripts run as `python benchmarks/NAME.py`, so this module is importable as `publish`."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nSpeed is reported as ratios measured in one run on one machine.\n"


def publish(lines: list[str], results: Path) -> str:
    """Print the lines as one text and append it to `results`; returns the text."""
    text = "\n".join(lines)
    print(text)
    results = Path(results)
    if not results.exists():
        results.write_text(HEADER)
    with open(results, "a") as f:
        f.write(text)
    return text
