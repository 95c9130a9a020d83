"""Status lines and progress bars on stderr, from the main process only, so stdout stays parseable."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import typer

from ltcache.distributed import is_main_process

T = TypeVar("T")


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
