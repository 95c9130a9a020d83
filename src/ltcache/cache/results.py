"""Where `ltcache compare` writes heads/ and reports/, and how, so that no earlier result is ever lost.

The folder (the cache itself, or `compare --out DIR`) may be:
- the cache being compared;
- a new or empty folder (it is then marked as this cache's results with `ltcache-results.json`);
- a results folder that ltcache made for the same cache (its marker names it).

Anything else (another cache, another cache's results, a user's folder, a folder inside the cache) is a one-line
refusal before anything is fitted.

A comparison is built whole in a locked `.compare.staging-PID` folder beside heads/ and reports/, then published
under the folder's exclusive lock (the cache's lock in a cache, with its generation checked). An earlier comparison
is not replaced but moved to `history/STAMP/` first, so `reports/` is always the newest and every earlier one stays
readable (`ltcache report CACHE/history/STAMP`). Two compares into one folder are serialised by the lock: the second
archives the first.

Why history instead of refusing without --overwrite: re-running compare (an ablation after the paper's five, a
second seed) is the lab's everyday loop, and a refusal would teach users to pass --overwrite by reflex, which is
exactly how results get lost. Keeping `reports/` as the newest keeps every path that scripts read stable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ltcache.cache.reader import read_manifest
from ltcache.cache.schema import MANIFEST
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import (
    CACHE,
    RESULTS,
    file_in_the_way,
    folder_lock,
    is_locked,
    made_by_ltcache,
    make_locked_folder,
    read_marker,
    real_path,
    write_marker,
)

ENTRIES = ("heads", "tensorboard", "reports")  # published in this order: reports/results.json arriving is the commit
HISTORY = "history"
STAGING_PREFIX = ".compare.staging-"
_MARKER_KIND = "ltcache compare results"


def marked_cache(folder: Path) -> Path | None:
    """The cache that the results folder `folder` belongs to, from its marker (relative path first, so a moved
    workspace still resolves), or None when `folder` has no valid marker."""
    marker = read_marker(folder, RESULTS)
    if marker is None or marker.get("kind") != _MARKER_KIND:
        return None
    relative = marker.get("cache_relative")
    if isinstance(relative, str) and (Path(folder) / relative / MANIFEST).is_file():
        return real_path(Path(folder) / relative)
    return real_path(Path(str(marker["cache"])))


def check_results_folder(results: Path, cache_path: Path) -> None:
    """Before any fit: heads/ and reports/ may be written to `results` (see the module's rule), and it is writable."""
    results, cache_real = Path(results), real_path(cache_path)
    real = real_path(results)
    in_cache = real == cache_real
    if not in_cache:
        shown = f"--out {results}"
        if results.is_symlink():
            raise LtcacheError(f"{shown} is a symbolic link; pass the folder it points to, or a new folder")
        if results.exists() and not results.is_dir():
            raise LtcacheError(f"{shown} is a file; pass a folder for heads/ and reports/")
        if cache_real in real.parents:
            raise LtcacheError(f"{shown} lies inside the cache {cache_path}; omit --out to write into the cache, or "
                               "pass a folder outside it")
        if real in cache_real.parents:
            raise LtcacheError(f"{shown} holds the cache {cache_path}; pass a new folder for this comparison")
        blocking = file_in_the_way(real)
        if blocking is not None:
            raise LtcacheError(f"{shown}: {blocking} is a file, so the folder cannot be made there")
        if results.is_dir() and _has_content(results):
            owner = marked_cache(results)
            if owner is None:
                if (results / MANIFEST).exists():
                    what = "is another cache" if made_by_ltcache(results, CACHE) else "holds a manifest.json"
                    raise LtcacheError(f"{shown} {what}; compare writes into its own cache (omit --out) or into a "
                                       "new folder")
                raise LtcacheError(f"{shown} holds files that ltcache compare did not make for this cache; pass a "
                                   "new or empty folder")
            if owner != cache_real:
                raise LtcacheError(f"{shown} holds the compare results of another cache ({owner}); pass a new "
                                   f"folder, or the results folder of {cache_path}")
    probe_root = results if results.is_dir() else next((p for p in results.parents if p.exists()), Path("."))
    probe = probe_root / f".ltcache-write-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        where = f"cache {cache_path}" if in_cache else f"--out {results}"
        hint = "pass --out DIR to write heads and reports elsewhere" if in_cache else "pass a writable folder"
        raise LtcacheError(f"{where} is not writable ({exc.strerror}); {hint}") from None


def _has_content(folder: Path) -> bool:
    """Whether `folder` holds anything besides compare's own staging folders."""
    return any(not p.name.startswith(STAGING_PREFIX) for p in folder.iterdir())


def clear_dead_staging(folder: Path) -> None:
    """Remove the staging folders of compares that died before publishing (the lock decides, not the PID)."""
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            if path.name.startswith(STAGING_PREFIX) and path.is_dir() and not is_locked(path):
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A new locked `.compare.staging-PID` folder inside `folder`, removed on exit (published entries have left)."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # a new --out: removed again if nothing lands
    folder.mkdir(parents=True, exist_ok=True)
    clear_dead_staging(folder)
    path = folder / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    fd = make_locked_folder(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        for created in made:  # innermost first; only while still empty (nothing was published)
            with contextlib.suppress(OSError):
                created.rmdir()


def publish(folder: Path, staged: Path, *, cache_path: Path, in_cache: bool) -> Path | None:
    """Move staged heads/ and reports/ into `folder`, the earlier ones (if any) first moved to history/STAMP/.
    The caller holds `folder`'s exclusive lock. Returns the history folder made, or None."""
    folder = Path(folder)
    if not in_cache:
        owner = marked_cache(folder)
        if owner is None:
            if _has_content(folder):
                raise LtcacheError(f"--out {folder} was filled by something else while compare ran; the new "
                                   "results were not written")
            write_marker(folder, RESULTS, {"kind": _MARKER_KIND, "cache": str(real_path(cache_path)),
                                           "cache_relative": os.path.relpath(real_path(cache_path), real_path(folder)),
                                           "format": 1})
        elif owner != real_path(cache_path):
            raise LtcacheError(f"--out {folder} became the results folder of another cache ({owner}) while compare "
                               "ran; the new results were not written")
    archive = None
    if any((folder / name).exists() for name in ENTRIES):
        archive = _history_folder(folder)
        for name in ENTRIES:
            if (folder / name).exists():
                os.rename(folder / name, archive / name)
    for name in ENTRIES:
        if (staged / name).exists():
            os.rename(staged / name, folder / name)
    return archive


def _history_folder(folder: Path) -> Path:
    """history/STAMP for the comparison now in `folder`: STAMP is when its results.json was written (UTC)."""
    results = folder / "reports" / "results.json"
    try:
        when = results.stat().st_mtime
    except OSError:
        when = time.time()
    stamp = time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(when))
    (folder / HISTORY).mkdir(exist_ok=True)
    for suffix in ("", *(f"-{i}" for i in range(2, 10_000))):
        candidate = folder / HISTORY / f"{stamp}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise LtcacheError(f"{folder / HISTORY} holds too many comparisons from {stamp}; remove some")


@contextlib.contextmanager
def results_lock(folder: Path, *, cache_path: Path, generation: str | None, in_cache: bool) -> Iterator[None]:
    """The exclusive lock under which a comparison is published: the cache's (and the cache must still be the one
    that was read: its manifest generation), or the --out folder's. Another compare waits for it."""
    with folder_lock(Path(folder), shared=False, what="cache" if in_cache else "compare results folder"):
        if in_cache:
            try:
                current = read_manifest(Path(cache_path)).get("generation")
            except LtcacheError:
                current = None
            if current != generation:
                raise LtcacheError(f"cache {cache_path} was replaced by another ltcache process while compare ran; "
                                   "nothing was written, re-run compare on the new cache")
        yield


def cache_of_results(results_file: Path) -> Path | None:
    """The cache a results.json was computed on, found from the file's own place (never the current folder): the
    cache folder it sits in (CACHE/reports, CACHE/history/STAMP/reports), or the cache named by the marker of the
    compare --out folder it sits in. None when neither is found (a results.json copied elsewhere)."""
    for folder in list(Path(results_file).resolve().parents)[1:5]:
        if (folder / MANIFEST).is_file():
            return folder
        cache = marked_cache(folder)
        if cache is not None:
            return cache
    return None


__all__ = ["cache_of_results", "check_results_folder", "publish", "results_lock", "staging"]
