"""The extract journal, and the merging of shards into a split: how a cache built by many processes, or resumed
after a kill, comes out the same as one built in one go.

Shard k of a split holds sample indices [k * shard_rows, (k + 1) * shard_rows), whichever process writes it. Each
finished shard is journalled (one JSON line: split, shard number, file, rows, sha256, label counts) in the staging
folder, beside the plan of the extract (PLAN). A resumed extract keeps the shards whose journal line and sha256 agree
and redoes the others; rank 0 merges every rank's shard list into the split's manifest entry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ltcache.cache.schema import shard_file
from ltcache.cache.writer import CacheWriter
from ltcache.core.distributed import get_rank, get_world_size
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import dead_staging
from ltcache.core.fsutil import sha256_file, write_json


def _dist():
    import torch.distributed as dist

    return dist


def rank_slice(items: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous items (shard numbers) [first, first + count) that `rank` of `world` takes (counts differ by at
    most one)."""
    base, extra = divmod(items, world)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


def merge_split(writer: CacheWriter, split: str, entry: dict, label_counts: np.ndarray, finished: dict, rows: int,
                shards: int) -> None:
    """Every process's new shards and label counts (metadata, never features), and the shards kept from an
    interrupted run, become the split's manifest entry on rank 0: shards in index order, every one present."""
    parts: list = [None] * get_world_size()
    mine = (entry["shards"], np.asarray(label_counts, dtype=np.int64))
    if get_world_size() > 1:
        _dist().all_gather_object(parts, mine)
    else:
        parts = [mine]
    if get_rank() != 0:
        return
    listed = [shard for part in parts for shard in part[0]] + [kept["entry"] for kept in finished.values()]
    by_number = {int(Path(shard["file"]).stem): shard for shard in listed}
    if sorted(by_number) != list(range(shards)) or len(listed) != shards:
        raise LtcacheError(f"split {split}: the shards written are {sorted(by_number)[:5]}..., expected each of "
                           f"0..{shards - 1} once; re-run extract without --resume")
    counts = np.zeros(max([len(part[1]) for part in parts] + [len(k["labels"]) for k in finished.values()] + [1]),
                      dtype=np.int64)
    for part in parts:
        counts[: len(part[1])] += part[1]
    for kept in finished.values():
        counts[: len(kept["labels"])] += np.asarray(kept["labels"], dtype=np.int64)
    entry = {"rows": rows, "shards": [by_number[k] for k in range(shards)]}
    if sum(shard["rows"] for shard in entry["shards"]) != rows:
        raise LtcacheError(f"split {split}: the shards hold {sum(s['rows'] for s in entry['shards'])} rows, "
                           f"expected {rows}; re-run extract without --resume")
    writer.add_finished(split, entry, counts)


PLAN = "extract.json"  # in the staging folder: what is being extracted, so that --resume continues only that


def find_interrupted(out: Path, plan: dict) -> Path:
    """The staging folder a killed extract of the same checkpoint and options left beside `out`."""
    candidates = dead_staging(out)
    for folder in candidates:
        try:
            saved = json.loads((folder / PLAN).read_text())
        except (OSError, ValueError):
            continue
        for key, value in plan.items():
            if saved.get(key) != value:
                raise LtcacheError(f"the interrupted extract in {folder.name} was run with another {key} "
                                   f"({saved.get(key)!r}, now {value!r}); run with the same options, or without "
                                   "--resume to start again")
        return folder
    raise LtcacheError(f"no interrupted extract of {out} to resume (no staging folder of a finished process beside "
                       "it); run without --resume")


def journal_entry(line: str) -> dict | None:
    """One line of an extract journal, validated whole, or None when it is not one (cut short by a kill, damaged):
    a split name, a shard number, a file SPLIT/NNNNN.h5 inside the staging folder, its sha256, and label counts of
    non-negative integers that add up to its rows."""
    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(item, dict):
        return None
    split, shard, file, rows, labels = (item.get(key) for key in ("split", "shard", "file", "rows", "labels"))
    counts_ok = isinstance(labels, list) and all(type(v) is int and v >= 0 for v in labels)
    if not (isinstance(split, str) and re.fullmatch(r"[a-z_]+", split) and type(shard) is int and shard >= 0
            and file == shard_file(split, shard) and type(rows) is int and rows >= 0 and counts_ok
            and sum(labels) == rows and isinstance(item.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", item["sha256"])):
        return None
    return item


def journalled_shards(staging: Path, plan: dict) -> dict[str, dict[int, dict]]:
    """Rank 0: record the plan (a new extract) or read the journals of an interrupted one, keeping each shard whose
    file still has the sha256 its journal line gives and removing every other shard file; broadcast to all ranks."""
    result: list = [None]
    if get_rank() == 0:
        kept: dict[str, dict[int, dict]] = {}
        if (staging / PLAN).is_file():
            for journal in sorted(staging.glob("journal-r*.jsonl")):
                for line in journal.read_text(errors="replace").splitlines():
                    item = journal_entry(line)
                    if item is None:
                        continue  # a line cut short by the kill, or damaged: its shard is extracted again
                    split, number, file = item["split"], item["shard"], staging / item["file"]
                    if file.is_file() and sha256_file(file) == item["sha256"]:
                        kept.setdefault(split, {})[number] = {
                            "entry": {"file": item["file"], "rows": item["rows"], "sha256": item["sha256"]},
                            "labels": item["labels"]}
            for folder in (path for path in staging.iterdir() if path.is_dir()):
                for shard in folder.iterdir():  # unjournalled or damaged shards, temporary files: redone
                    if shard.name.endswith(".h5") and shard.stem.isdigit() and int(shard.stem) in kept.get(
                            folder.name, {}):
                        continue
                    shard.unlink()
        write_json(staging / PLAN, plan)
        result = [kept]
    if get_world_size() > 1:
        _dist().broadcast_object_list(result, src=0)
    return result[0]
