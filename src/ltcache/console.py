"""Status lines and progress bars on stderr, from the main process only, so stdout stays parseable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import typer

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
    """A progress bar when stderr is a terminal; the bare iterable otherwise (logs stay clean)."""
    if not (is_main_process() and sys.stderr.isatty()):
        yield from items
        return
    with typer.progressbar(items, length=length, label=label, file=sys.stderr) as bar:
        yield from bar
