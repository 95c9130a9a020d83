"""Status lines and progress bars on stderr, from the main process only, so stdout stays parseable."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_main_process() -> bool:
    """Rank 0, or a single process. Read from torch.distributed only when it was imported (no torch here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def progress(items: Iterable[T], *, label: str, length: int | None = None) -> Iterator[T]:
    """A progress line on stderr when it is a terminal (count, total and elapsed time, redrawn at most 5 times a
    second); the bare iterable otherwise, so logs stay clean."""
    if not (is_main_process() and sys.stderr.isatty()):
        yield from items
        return
    total = length if length is not None else (len(items) if hasattr(items, "__len__") else None)
    start = drawn = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - drawn >= 0.2 or done == total:
            drawn = now
            of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            sys.stderr.write(f"\r{label}  {done}{of}  {now - start:.0f} s")
            sys.stderr.flush()
    sys.stderr.write("\n")
