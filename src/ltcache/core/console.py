"""Messages and progress, from the main process only, on stderr, so stdout stays parseable.

Every message of the library (compare's per-method lines, training's epoch lines, notes and warnings) goes through
the standard `logging` logger "ltcache" at INFO (WARNING for warnings): a notebook or a script silences, raises or
redirects them like any library's (`logging.getLogger("ltcache").setLevel(logging.WARNING)`). The command line
installs `cli_handler`, which prints them bare, as they always were. Progress bars are drawn only on a terminal,
and only when that logger would show an INFO message."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LOGGER = logging.getLogger("ltcache")


def is_main_process() -> bool:
    """Rank 0, or a single process. Read from torch.distributed only when it was imported (no torch here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """An INFO message of the "ltcache" logger, from the main process (a warning: `message` starts 'warning:')."""
    if is_main_process():
        LOGGER.log(logging.WARNING if message.startswith("warning:") else logging.INFO, message)


class _Stderr(logging.Handler):
    """The command line's handler: each message bare, on the stderr of the moment (a test runner may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a handler never raises
            self.handleError(record)


def cli_handler() -> None:
    """Show the library's messages on stderr, bare, at INFO and above (once, however often it is called)."""
    if not any(isinstance(h, _Stderr) for h in LOGGER.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.level_before = LOGGER.level
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)


def remove_cli_handler() -> None:
    """Undo `cli_handler` (a command run in-process, by a test or a notebook, leaves no handler behind)."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, _Stderr)]:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(handler.level_before)


def _shows_progress() -> bool:
    return is_main_process() and sys.stderr.isatty() and LOGGER.isEnabledFor(logging.INFO) and LOGGER.hasHandlers()


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def rate_text(done: float, elapsed: float, unit: str) -> str:
    """'1,234 images/s' ('- images/s' before any time has passed)."""
    return f"{done / elapsed:,.0f} {unit}/s" if elapsed > 0 else f"- {unit}/s"


def progress(items: Iterable[T], *, label: str, length: int | None = None, unit: str = "batches",
             per_item=None, total_units: int | None = None) -> Iterator[T]:
    """A progress bar on stderr when it is a terminal: a bar, done / total, `unit`/s and time left, redrawn at
    most 5 times a second; the bare iterable otherwise, so logs stay clean. `per_item(item)` counts the units in
    an item (images in a batch; under torchrun, every rank's, so that rank 0 shows the global count), of
    `total_units` in all; without it each item is one unit of `length`."""
    if not _shows_progress():
        yield from items
        return
    total = total_units if total_units is not None else (
        length if length is not None else (len(items) if hasattr(items, "__len__") else None))
    start = drawn = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += per_item(item) if per_item is not None else 1
        now = time.monotonic()
        if now - drawn >= 0.2 or (total and done >= total):
            drawn = now
            sys.stderr.write("\r" + progress_line(label, done, total, now - start, unit) + "\x1b[K")
            sys.stderr.flush()
    sys.stderr.write("\n")


def progress_line(label: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """'epoch 3  [#########-----------]  1,200/2,400 images  812 images/s  1 s left' (a bar only with a total)."""
    if not total:
        return f"{label}  {done:,} {unit}  {rate_text(done, elapsed, unit)}  {duration(elapsed)}"
    share = min(done / total, 1.0)
    bar = "#" * int(20 * share) + "-" * (20 - int(20 * share))
    left = elapsed * (total - done) / done if done else float("nan")
    eta = duration(left) + " left" if left == left else "- left"
    return f"{label}  [{bar}]  {done:,}/{total:,} {unit}  {rate_text(done, elapsed, unit)}  {eta}"
