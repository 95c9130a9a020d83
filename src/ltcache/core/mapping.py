"""Map a split's shards into one contiguous, copy-on-write float32 (or float16) array without reading them.

Opening a cache by reading it costs a page fault per 4 KiB of fresh memory plus a copy; on virtual machines the
faults alone take seconds per GiB. Instead the feature block of every shard (contiguous, uncompressed, page
aligned by the writer) is mmap'ed MAP_PRIVATE at consecutive addresses of one reserved range: the split is one
array over the page cache, faulted in lazily (with the kernel's fault-around), never copied, and shared with any
other process reading the same cache. Writes to the array stay private to the process (copy-on-write); the
files are never modified in place by ltcache (every write is a new file renamed into place), so a mapping
cannot change under a reader. Linux only; anything else falls back to reading.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
MAP_FIXED, PROT_NONE = 0x10, 0x0  # Linux values; the mmap module does not export these two
_FAILED = ctypes.c_void_p(-1).value


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class _Mapping:
    """Owns one reserved address range; numpy keeps it alive as the base of the array (__array_interface__), and
    it is unmapped when the last array or tensor over it is freed."""

    def __init__(self, libc, address: int, length: int, shape: tuple[int, int], typestr: str):
        self._libc, self.address, self.length = libc, address, length
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": typestr, "version": 3}

    def __del__(self):
        self._libc.munmap(self.address, self.length)


def map_rows(pieces: list[tuple[Path, int, int]], shape: tuple[int, int], dtype=np.float32) -> np.ndarray | None:
    """One writable [rows, dim] array of little-endian `dtype` (float32 or float16) over `pieces` = (file, byte
    offset, byte length) in row order, or None when the platform or the layout does not allow it (the caller then
    reads the shards)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if sys.platform != "linux" or not pieces:
        return None
    total = sum(length for _, _, length in pieces)
    if total != shape[0] * shape[1] * dtype.itemsize or total == 0:
        return None
    # Every piece must start on a page in its file and (all but the last) end on one, to sit back to back.
    if any(offset % PAGE for _, offset, _ in pieces) or any(length % PAGE for _, _, length in pieces[:-1]):
        return None
    libc = _libc()
    reserved = -(-total // PAGE) * PAGE
    base = libc.mmap(None, reserved, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, _FAILED):
        return None
    owner = _Mapping(libc, base, reserved, shape, dtype.str)  # from here on, failure unmaps everything via __del__
    position = 0
    for path, offset, length in pieces:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < offset + length:  # a short file would fault (SIGBUS) on access
                return None
            address = libc.mmap(base + position, length, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        if address != base + position:
            return None
        position += length
    return np.asarray(owner)
