"""Output folders that are never lost: built beside their target, swapped in whole, guarded by locks.

Every folder ltcache makes (a run folder, a cache) is first built under `.NAME.staging-PID` next to its target,
and moved into place in one step once it holds its first usable result (a checkpoint, a manifest). With
`--overwrite` the old folder is swapped out by one atomic exchange (Linux renameat2 RENAME_EXCHANGE), so there is
no moment without a folder at the path, and deleted only afterwards.

Locks are flock(2) locks on the folders themselves, so they vanish with the process that held them (a SIGKILL
leaves no stale lock) and no lock file is ever left behind:
- a writer holds an exclusive lock on its staging folder, which stays on the folder when it moves into place;
  a second writer to the same target sees it and is refused;
- readers of a cache hold a shared lock while they load it, and an exclusive one while they write heads and
  reports; a writer replacing the cache takes the exclusive lock for its swap, so a reader never sees a cache
  half-replaced, and notices a swap that happened while it computed through the manifest's generation.

What a killed writer leaves (`.NAME.staging-PID`, `.NAME.retired-PID`) is removed by the next writer to the same
target once the process is gone; a complete staging folder whose target is missing (a crash between the two renames
of the fallback swap) is moved into place instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ltcache.core.errors import LtcacheError

LOCK_WAIT_SECONDS = 600.0  # how long a command waits for another process's short critical section
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True)
class FolderKind:
    """What ltcache makes: a folder is ltcache's when it holds `marker` (JSON with `required_keys`, and, when
    `self_hash` names a key, carrying the sha256 of its own content there) and the file `complete`.

    Two keys are not proof: a user's folder whose manifest.json happens to carry `schema_version` and `splits` is not
    a cache. A marker's own hash (as extract writes `manifest_sha256`) is what a hand-written file does not have."""

    label: str
    marker: str
    complete: str
    required_keys: tuple[str, ...]
    self_hash: str | None = None
    source_of: Callable[[dict], dict] | None = None  # what the folder was made from, read from its marker


def _dataset_and_backbone(dataset: object, backbone: object) -> dict:
    return {"dataset": dataset.get("name") if isinstance(dataset, dict) else None, "backbone": backbone}


def _run_source(marker: dict) -> dict:
    config = marker.get("config")
    return _dataset_and_backbone(marker.get("dataset"), config.get("backbone") if isinstance(config, dict) else None)


def _cache_source(marker: dict) -> dict:
    backbone = marker.get("backbone")
    return _dataset_and_backbone(marker.get("dataset"), backbone.get("arch") if isinstance(backbone, dict) else None)


# --overwrite replaces a run or a cache only with one of the same source: the same dataset and backbone (a rerun,
# a re-extraction with other options or a retrained checkpoint), never a run or cache of something else.
RUN = FolderKind("run folder", "config.json", "checkpoint.pt", ("config", "dataset"), source_of=_run_source)
CACHE = FolderKind("cache folder", "manifest.json", "manifest.json", ("schema_version", "splits", "generation"),
                   self_hash="manifest_sha256", source_of=_cache_source)
# compare --out: heads/ and reports/ of the comparisons of one cache (ltcache-results.json names the cache)
RESULTS = FolderKind("compare results folder", "ltcache-results.json", "ltcache-results.json",
                     ("kind", "cache"), self_hash="marker_sha256")


def read_marker(path: Path, kind: FolderKind) -> dict | None:
    """The marker of a folder ltcache made of this kind, or None when `path` is not one (no marker, not JSON, keys
    or own hash missing or wrong, or its `complete` file absent)."""
    from ltcache.core.fsutil import canonical_sha256

    path = Path(path)
    try:
        content = json.loads((path / kind.marker).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or not all(key in content for key in kind.required_keys):
        return None
    if kind.self_hash is not None:
        own = {key: value for key, value in content.items() if key != kind.self_hash}
        try:
            if content.get(kind.self_hash) != canonical_sha256(own):
                return None
        except (TypeError, ValueError):
            return None
    return content if (path / kind.complete).is_file() else None


def made_by_ltcache(path: Path, kind: FolderKind) -> bool:
    """Whether `path` is a folder that ltcache made of this kind (see `read_marker`)."""
    return read_marker(path, kind) is not None


def write_marker(path: Path, kind: FolderKind, content: dict) -> dict:
    """Write `kind`'s marker into the folder `path`, sealed with its own hash when the kind has one."""
    from ltcache.core.fsutil import canonical_sha256, write_json

    content = dict(content)
    if kind.self_hash is not None:
        content.pop(kind.self_hash, None)
        content[kind.self_hash] = canonical_sha256(content)
    write_json(Path(path) / kind.marker, content)
    return content


def real_path(path: Path) -> Path:
    """`path` with ~ expanded and every symbolic link resolved."""
    return Path(os.path.realpath(Path(path).expanduser()))


def file_in_the_way(real: Path) -> Path | None:
    """The nearest existing folder-or-file at or above the resolved path `real`, when it is a file (no folder can
    be made there), else None."""
    for parent in (real, *real.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_target(path: Path, *, kind: FolderKind, overwrite: bool, inputs: Iterable[Path | str | None] = (),
                 option: str = "--out", source: dict | None = None) -> None:
    """Raise unless a new `kind` may be written at `path`. Read-only, so every torchrun rank can call it.

    Refused always: a file, a symbolic link, the current folder or one of its parents, a folder that holds one of
    the command's `inputs`. Refused without `overwrite`: a non-empty folder. Refused even with it: a folder that
    ltcache did not make, or one that another ltcache process is writing.
    """
    path = Path(path)
    shown = f"{kind.label} {path}"
    if path.is_symlink():
        raise LtcacheError(f"{shown} is a symbolic link; pass the folder it points to, or a new path, to {option}")
    if path.exists() and not path.is_dir():
        raise LtcacheError(f"{shown} exists and is not a folder; pass a new folder to {option}")
    real, cwd = real_path(path), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise LtcacheError(f"{option} {path} is the current folder or one of its parents; pass a new folder such as "
                           f"{option} runs/NAME")
    for given in inputs:
        if given is None:
            continue
        given_real = real_path(Path(given))
        if given_real == real or real in given_real.parents:
            raise LtcacheError(f"{shown} holds this command's input {given}; pass another folder to {option}")
    blocking = file_in_the_way(real)
    if blocking is not None:
        raise LtcacheError(f"{shown}: {blocking} is a file, so the folder cannot be made there")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LtcacheError(f"{shown} already exists; choose another path or pass --overwrite")
        check_replaceable(path, kind, source, option)
    if is_locked(path):
        raise LtcacheError(f"{shown} is in use by another ltcache process; wait for it to finish or pass another "
                           f"folder to {option}")
    for other in _siblings(path, "staging"):
        if _is_live(other):
            raise LtcacheError(f"another ltcache process is already writing {shown} (in {other.name}); wait for it "
                               f"to finish or pass another folder to {option}")


def check_replaceable(path: Path, kind: FolderKind, source: dict | None, option: str = "--out") -> None:
    """Refuse to replace `path` unless ltcache made it as a `kind` (a sealed marker) from the same source
    (`source`'s non-None values, e.g. dataset and backbone, against what its marker records)."""
    marker = read_marker(path, kind)
    if marker is None:
        raise LtcacheError(f"{path} is not an ltcache {kind.label} (it has no valid {kind.marker}); --overwrite "
                           f"only replaces what ltcache made, so pass another folder to {option}")
    if source is None or kind.source_of is None:
        return
    theirs = kind.source_of(marker)
    if any(value is not None and theirs.get(key) != value for key, value in source.items()):
        def shown(values: dict) -> str:
            return " / ".join(f"{key} {values.get(key)}" for key in source)

        raise LtcacheError(f"{path} is a {kind.label} of {shown(theirs)}, and this command makes one of "
                           f"{shown(source)}; --overwrite replaces only what ltcache made from the same source, so "
                           f"pass another folder to {option} (or remove {path} yourself)")


# ---------------------------------------------------------------------------------------------------- locks


def _open_folder(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock: locking is then best-effort
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise


def is_locked(path: Path) -> bool:
    """Whether another process holds an exclusive lock on the folder `path`: a writer owns it right now (readers'
    shared locks do not count)."""
    fd = _open_folder(path) if Path(path).is_dir() else None
    if fd is None:
        return False
    try:
        return not _try_lock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def hold_exclusive(path: Path, busy: str) -> int:
    """Take the exclusive lock on the folder `path` for as long as the returned fd stays open (close it to release);
    `busy` is the error when another process holds it."""
    fd = _open_folder(path)
    if fd is None:
        raise LtcacheError(f"cannot open folder {path}")
    if not _try_lock(fd, fcntl.LOCK_EX):
        os.close(fd)
        raise LtcacheError(busy)
    return fd


def _is_live(folder: Path) -> bool:
    """A staging or retired folder belongs to a live writer exactly when it is locked: the lock, not the PID in its
    name, decides (a dead writer's PID may since belong to another process). A writer makes its staging folder
    under a private name, locks it and only then renames it to `.NAME.staging-PID` (`make_locked_folder`), so
    there is no instant in which a live writer's staging folder is unlocked."""
    return is_locked(folder)


def make_locked_folder(path: Path) -> int:
    """mkdir `path` already holding an exclusive lock on it (returned fd; close it to release): made at a private
    name, locked, then renamed into place, so no other process ever sees it unlocked."""
    path = Path(path)
    private = path.with_name(f".{path.name}.making-{os.getpid()}-{time.monotonic_ns()}")
    private.mkdir()
    fd = _open_folder(private)
    if fd is None or not _try_lock(fd, fcntl.LOCK_EX):
        shutil.rmtree(private, ignore_errors=True)
        raise LtcacheError(f"cannot lock the new folder {path}")
    try:
        os.rename(private, path)
    except OSError:
        os.close(fd)
        shutil.rmtree(private, ignore_errors=True)
        raise
    return fd


@contextlib.contextmanager
def folder_lock(path: Path, *, shared: bool, what: str) -> Iterator[int | None]:
    """Hold a shared or exclusive lock on the folder now at `path`, waiting (with a note on stderr) while another
    ltcache process holds a conflicting one. If the folder is swapped while waiting, the new one is locked.
    Yields the locked folder's fd (None where the folder cannot be opened: the caller's own checks then fail)."""
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline, noted = time.monotonic() + LOCK_WAIT_SECONDS, False
    while True:
        fd = _open_folder(path)
        if fd is None:
            yield None
            return
        while not _try_lock(fd, kind):
            if not noted:
                print(f"waiting for another ltcache process using {what} {path} ...", file=sys.stderr, flush=True)
                noted = True
            if time.monotonic() > deadline:
                os.close(fd)
                raise LtcacheError(f"{what} {path} stayed locked by another ltcache process for "
                                   f"{LOCK_WAIT_SECONDS:.0f} s; wait for it to finish, then retry")
            time.sleep(0.1)
        try:
            still_there = os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError:
            still_there = False
        if still_there:
            break
        os.close(fd)  # swapped while we waited: lock the folder that is there now
    try:
        yield fd
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ staged folders


def dead_staging(target: Path) -> list[Path]:
    """The staging folders beside `target` whose writer is gone (killed before it finished), newest first."""
    dead = [folder for folder in _siblings(Path(target), "staging") if not _is_live(folder)]
    return sorted(dead, key=lambda folder: folder.stat().st_mtime, reverse=True)


def _siblings(target: Path, role: str) -> list[Path]:
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return []
    prefix = f".{target.name}.{role}-"
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def recover(target: Path, kind: FolderKind) -> Path | None:
    """Clear what killed writers left beside `target`; returns `target` when a complete folder was moved back to it.

    A complete staging folder (it holds `kind.complete`) whose target is missing was interrupted between the two
    renames of a swap: it is moved into place. Any other staging or retired folder of a finished process is removed.
    """
    target, restored = Path(target), None
    for folder in [*_siblings(target, "staging"), *_siblings(target, "retired")]:
        if _is_live(folder):
            continue
        complete = folder.name.startswith(f".{target.name}.staging-") and (folder / kind.complete).is_file()
        if complete and not target.exists():
            os.rename(folder, target)
            restored = target
            print(f"restored {kind.label} {target} from an interrupted swap ({folder.name})", file=sys.stderr,
                  flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return restored


class StagedFolder:
    """A new `kind` folder for `target`, built at `.NAME.staging-PID` beside it and moved into place by `publish`.

    The staging folder is locked for the whole life of the object (the lock moves with it into place) and released by
    `close`. `abort` removes everything this object created. Checks `check_target` first.
    """

    def __init__(self, target: Path, *, kind: FolderKind, overwrite: bool, inputs: Iterable = (),
                 option: str = "--out", adopt: Path | None = None, source: dict | None = None):
        self.target, self.kind, self.overwrite, self.source = Path(target), kind, overwrite, source
        inputs = list(inputs)
        check_target(self.target, kind=kind, overwrite=overwrite, inputs=inputs, option=option, source=source)
        self.path = self.target.with_name(f".{self.target.name}.staging-{os.getpid()}")
        self._fd: int | None = None
        if adopt is not None:  # a dead writer's staging folder, continued (extract --resume): locked, then ours
            self._fd = _open_folder(Path(adopt))
            if self._fd is None or not _try_lock(self._fd, fcntl.LOCK_EX):
                self.close()
                raise LtcacheError(f"{adopt} belongs to a running ltcache process; wait for it to finish")
            os.rename(adopt, self.path)
        if recover(self.target, kind) is not None:  # a dead writer's complete folder is now at the target
            check_target(self.target, kind=kind, overwrite=overwrite, inputs=inputs, option=option, source=source)
        self.created = _make_parents(self.target.parent)
        try:
            if adopt is None:
                shutil.rmtree(self.path, ignore_errors=True)
                self._fd = make_locked_folder(self.path)
        except OSError as exc:
            self._remove_parents()
            raise LtcacheError(f"cannot create {kind.label} next to {self.target}: {exc.strerror}; pass a writable "
                               f"folder to {option}") from None
        self.published = False

    def publish(self) -> Path:
        """Move the staged folder to the target. An existing target (allowed by --overwrite and still ltcache's) is
        swapped out in one atomic step, once no reader holds it, and then deleted."""
        target = self.target
        if target.is_dir() and any(target.iterdir()):
            if not self.overwrite or not made_by_ltcache(target, self.kind):
                raise LtcacheError(f"{self.kind.label} {target} appeared while this command ran; the new result stays "
                                   f"in {self.path}")
            check_replaceable(target, self.kind, self.source)
            with folder_lock(target, shared=False, what=self.kind.label):
                retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
                if _exchange(self.path, target):
                    os.rename(self.path, retired)  # the staging name now holds the old folder
                else:
                    os.rename(target, retired)
                    os.rename(self.path, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()  # an empty folder (the user made it for us)
            os.rename(self.path, target)
        self.path, self.published = target, True
        return target

    def abort(self) -> None:
        """Remove the staged folder (if not yet published) and the parents this object created."""
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
            self._remove_parents()
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _remove_parents(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so a failed command can remove them again."""
    missing = []
    folder = Path(folder) if str(folder) else Path(".")
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    return list(reversed(missing))
