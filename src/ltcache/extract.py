"""Run a trained backbone in eval mode over train, val and test, and write the feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ltcache.cache import CacheWriter
from ltcache.checkpoint import CHECKPOINT_FORMAT, OFFICIAL, load_model_state, load_weights_into, read_weights
from ltcache.config import EXTRACT
from ltcache.console import log, progress
from ltcache.data import SPLITS, DatasetSpec, build_dataset
from ltcache.distributed import barrier, get_rank, get_world_size, init_distributed
from ltcache.errors import LtcacheError
from ltcache.folders import dead_staging
from ltcache.fsutil import sha256_file, write_json
from ltcache.hub import build_frozen, check_frozen, describe_frozen, split_name
from ltcache.models import build_model, check_backbone
from ltcache.options import SHARD_ROWS
from ltcache.params import checked
from ltcache.runtime import command_line, resolve_device
from ltcache.train import images_to


@checked(*EXTRACT)
def extract(checkpoint: Path | None, out: Path, *, dataset: str | None = None, backbone: str | None = None,
            pretrained: bool = False, root: str | None = None, split_dir: str | None = None, dtype: str = "float32",
            batch_size: int = 512, workers: int = 0, device: str | None = None, shard_rows: int = SHARD_ROWS.default,
            overwrite: bool = False, train_views: int = 0, resume: bool = False, joint_head: str = "auto",
            zero_shot: bool = False, class_names: Path | None = None, templates: str = "openai") -> Path:
    """Write penultimate features, labels and sample indices of every split, plus the joint head, to `out`.

    `checkpoint` None extracts `backbone` as it is (hub.py): a torchvision model or ltcache backbone, `timm:<name>`
    or `open_clip:<arch>/<tag>`, with pretrained weights (`pretrained`) or random ones. A library's backbone, and
    any pretrained one, is fed its library's own preprocessing (grayscale replicated to RGB); an ltcache or
    torchvision backbone with random weights gets the dataset's test transform. The joint head (`joint_head`) is
    the model's own classifier when its classes are the dataset's (`auto`) or when asked (`own`), else an
    instance-balanced linear probe fitted on the cached train features. `zero_shot` (CLIP) also stores a text head
    built from the class names (`class_names` file, else the dataset's) and prompt `templates` (openai, simple or a
    file). The manifest records the library, the model, the weights, the preprocessing and the heads' sources.

    With train_views K > 0, also a `train_views` split of K augmented views of every train image (the stage-1
    train transform, seeded by the run's seed and the view number): row k * len(train) + i is view k of image i.

    Shard k of a split holds sample indices [k * shard_rows, (k + 1) * shard_rows), whichever process writes it, so
    the cache is the same under any number of torchrun processes. Each finished shard is journalled in the staging
    folder; with `resume`, a killed extract's staging folder is continued: the shards whose journal line and sha256
    agree are kept and only the others are extracted.
    """
    if train_views < 0:
        raise LtcacheError(f"--train-views must be >= 0, got {train_views}")
    model_source = None  # without a checkpoint: what the backbone is (library, weights), for the plan and manifest
    if checkpoint is None:
        if dataset is None or backbone is None:
            raise LtcacheError("without a checkpoint, pass --backbone and --dataset (e.g. --backbone resnet50 "
                               "--pretrained --dataset imagefolder --root /data/images)")
        check_frozen(backbone, pretrained, joint_head=joint_head, zero_shot=zero_shot, templates=templates)
        if train_views and (pretrained or split_name(backbone)[0] is not None):  # before any weight is fetched
            raise LtcacheError("--train-views augments with the dataset's own transform, not this backbone's "
                               "preprocessing; drop --train-views")
        weights, about = None, {"format": "none", "epoch": None}
        model_source = describe_frozen(backbone, pretrained)
        config = {"backbone": backbone, "seed": 0, "source": model_source["weights"] or "random weights"}
        described = {"name": dataset}
    elif pretrained or zero_shot or joint_head != "auto":
        flag = "--pretrained" if pretrained else "--zero-shot" if zero_shot else "--joint-head"
        raise LtcacheError(f"{flag} is for extracting a --backbone without a checkpoint; {checkpoint} brings its own "
                           f"weights and classifier, so drop {flag}")
    else:
        weights, about = read_weights(checkpoint)
        if about["format"] == CHECKPOINT_FORMAT:
            for name, value in (("--dataset", dataset), ("--backbone", backbone)):
                if value is not None:
                    raise LtcacheError(f"{checkpoint} is an ltcache checkpoint, which records its own dataset and "
                                       f"backbone; drop {name}")
            config, described = about["config"], about["dataset"]
        else:
            if dataset is None or backbone is None:
                raise LtcacheError(f"{checkpoint} is a {OFFICIAL} checkpoint, which records neither its dataset nor "
                                   "its architecture; pass --dataset, --backbone and --root (e.g. --dataset "
                                   "imagenet-lt --backbone resnext50_32x4d --root /data/imagenet)")
            check_backbone(backbone)
            config = {"backbone": backbone, "seed": 0, "source": OFFICIAL}
            described = {"name": dataset}
    spec = DatasetSpec.from_dict(described, root=root, split_dir=split_dir)
    inputs = [checkpoint, spec.root, spec.split_dir]  # the cache folder may not hold what it is made from
    writer_args = {"dtype": dtype, "shard_rows": shard_rows, "overwrite": overwrite, "inputs": inputs,
                   "source": {"dataset": spec.name, "backbone": config["backbone"]}}
    CacheWriter.check_target(Path(out), **writer_args)
    plan = {"checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint is not None else None,
            "model": model_source, "dtype": dtype, "shard_rows": shard_rows, "train_views": train_views,
            "dataset": spec.to_dict(),
            # eval-mode features do not depend on the batch in exact arithmetic, but BLAS and cuDNN pick kernels by
            # shape, so two batch sizes give features that differ in the last bits: one cache, one batch size
            "batch_size": batch_size}
    adopt = find_interrupted(Path(out), plan) if resume else None
    data = build_dataset(spec)
    augmented_train = data.splits["train"]
    data.splits["train"] = augmented_train.with_transform(data.splits["test"].transform)  # test-time transform
    if "train_class_counts" in described and data.class_counts != described["train_class_counts"]:
        raise LtcacheError(f"the dataset under {spec.root} gives train class counts {data.class_counts[:5]}... "
                           f"but the checkpoint was trained on {described['train_class_counts'][:5]}...; "
                           "pass the --root the backbone was trained on")
    frozen = None
    if checkpoint is None:
        torch.manual_seed(int(config["seed"]))  # random weights (and the text tower's) are the same in every run
        frozen = build_frozen(backbone, pretrained, num_classes=data.num_classes, in_channels=data.in_channels,
                              class_names=data.class_names, joint_head=joint_head, zero_shot=zero_shot,
                              names_file=class_names, templates=templates, device=resolve_device(device))
        model, model_source = frozen.classifier, {**model_source, **frozen.about}
        if frozen.transform is not None:  # the library's own resize, crop, mean and std, not the dataset's
            for split in list(data.splits):
                data.splits[split] = data.splits[split].with_transform(frozen.transform)
    else:
        model = build_model(config["backbone"], data.num_classes, data.in_channels)
        if about["format"] == CHECKPOINT_FORMAT:
            load_model_state(model, weights, checkpoint, config["backbone"])
        else:  # names the first key that does not map
            load_weights_into(model, weights, checkpoint, config["backbone"])
    run_device = resolve_device(device)
    init_distributed(run_device)  # under torchrun: one process group, every rank extracts its own slice
    if (get_world_size() > 1 or resume) and train_views:
        raise LtcacheError("--train-views is not supported under torchrun or with --resume yet (the views' random "
                           "augmentations would differ from one uninterrupted process); extract them in one process")
    model.to(run_device).eval()
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    writer = open_writer(Path(out), model.feature_dim, writer_args, adopt=adopt)
    rank, world = get_rank(), get_world_size()
    loader_args = {"batch_size": batch_size, "shuffle": False, "num_workers": workers,
                   "pin_memory": run_device.type == "cuda"}

    def write_rows(split_writer, dataset, label: str, offset: int = 0, batches: list[list[int]] | None = None) -> None:
        if batches is None:
            loader = DataLoader(dataset, generator=torch.Generator().manual_seed(torch.initial_seed()), **loader_args)
        else:  # batches that never cross a shard: each shard's rows are computed alike in any run, resumed or split
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                pin_memory=run_device.type == "cuda")
        with torch.inference_mode():
            for images, labels, index in progress(loader, label=label, length=len(loader)):
                features = model.backbone(images_to(images, run_device)).float()
                split_writer.add(features.cpu().numpy(), labels.numpy(), index.numpy() + offset)

    try:
        done = journalled_shards(writer.staging, plan)  # {} for a new extract, which records its plan
        for split in (name for name in SPLITS if name in data.splits):
            dataset = data.splits[split]
            shards = -(-len(dataset) // shard_rows)
            first, count = rank_slice(shards, rank, world)  # whole shards per rank: the same cache for any N
            if world > 1 and shards < 2 * world and len(dataset) >= 2 * world * 64:
                log(f"note: {split} has {shards} shard(s) of --shard-rows {shard_rows} for {world} processes, which "
                    "take whole shards; a smaller --shard-rows spreads the work")
            finished = done.get(split, {})
            todo = [k for k in range(first, first + count) if k not in finished]
            batches = [list(range(start, min(start + batch_size, k * shard_rows + shard_rows, len(dataset))))
                       for k in todo for start in range(k * shard_rows, min((k + 1) * shard_rows, len(dataset)),
                                                        batch_size)]
            rows = np.asarray([i for batch in batches for i in batch], dtype=np.int64)
            split_writer = writer.split(split, shard_ids=todo, journal=writer.staging / f"journal-r{rank:03d}.jsonl")
            if batches:
                write_rows(split_writer, dataset, f"extract {split}", batches=batches)
            entry = split_writer.close(len(dataset), expected_index=rows)
            merge_split(writer, split, entry, split_writer.label_counts, finished, len(dataset), shards)
            log(f"extracted {split}: {len(dataset)} rows x {model.feature_dim}"
                + (f" ({len(finished)} of {shards} shards kept from the interrupted run)" if finished else ""))
        if train_views:
            rows = len(augmented_train)
            views_writer = writer.split("train_views")
            for view in range(train_views):
                torch.manual_seed(int(config.get("seed", 0)) * 1_000_003 + view)  # each view reproducible alone
                write_rows(views_writer, augmented_train, f"extract train view {view + 1}/{train_views}", view * rows)
            writer.finish_split(views_writer, train_views * rows, views=train_views, of="train")
            log(f"extracted {train_views} augmented views of train: {train_views * rows} rows")
        if rank != 0:
            barrier()  # rank 0 commits; the cache exists when every rank returns
            return Path(out)
        for bookkeeping in [writer.staging / PLAN, *writer.staging.glob("journal-r*.jsonl")]:
            bookkeeping.unlink()  # the manifest is the cache's record from here on
        if frozen is not None and frozen.own is not None:  # the model's own classifier for these classes
            writer.write_joint_head(*frozen.own)
            model_source["joint_head"] = {"source": model_source.pop("joint_head_choice")}
        elif frozen is not None:  # no classifier for these classes: an instance-balanced linear probe on train
            weight, bias, model_source["joint_head"] = probe_on_written(writer, data.num_classes)
            model_source["joint_head"]["choice"] = model_source.pop("joint_head_choice")
            writer.write_joint_head(weight, bias)
        else:
            writer.write_joint_head(model.fc.weight, model.fc.bias)
        if frozen is not None and frozen.text is not None:
            writer.write_text_head(frozen.text)
        writer.write_membership(data.source_index)
        backbone = {"arch": config["backbone"],
                    "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                    "checkpoint_sha256": plan["checkpoint_sha256"], "epoch": about["epoch"],
                    "checkpoint_format": about["format"], "command": command_line(),
                    "resolved_config": config, **({"model": model_source} if model_source else {})}
        path = writer.commit(dataset=data.describe(), backbone=backbone)
        barrier()
        return path
    except KeyboardInterrupt:  # the finished shards stay for --resume (as after a kill); nothing is published
        if writer.folder is not None:
            writer.folder.close()
            log(f"interrupted: the finished shards are kept in {writer.staging}; continue with the same command "
                "and --resume")
        raise
    except BaseException:
        writer.abort()
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def probe_on_written(writer: CacheWriter, num_classes: int):
    """The linear probe (import_features.linear_probe) fitted on the train rows already written to the staging
    folder, read back shard by shard in index order."""
    import h5py

    from ltcache.import_features import linear_probe

    entry = writer.splits["train"]
    features = np.empty((entry["rows"], 0), dtype=np.float32)
    labels = np.empty(entry["rows"], dtype=np.int64)
    for shard in entry["shards"]:
        with h5py.File(writer.staging / shard["file"], "r") as f:
            index = f["index"][:]
            if features.shape[1] == 0:
                features = np.empty((entry["rows"], f["features"].shape[1]), dtype=np.float32)
            features[index] = f["features"][:]
            labels[index] = f["labels"][:]
    return linear_probe(torch.from_numpy(features), torch.from_numpy(labels), num_classes, seed=0)


def rank_slice(items: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous items (shard numbers) [first, first + count) that `rank` of `world` takes (counts differ by at
    most one)."""
    base, extra = divmod(items, world)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


def open_writer(out: Path, feature_dim: int, writer_args: dict, *, adopt: Path | None = None) -> CacheWriter:
    """Rank 0 makes the staging folder; under torchrun the other ranks write their shards into it (its path is
    broadcast, or rank 0's error, so that no rank waits on a folder that was never made)."""
    if get_world_size() == 1:
        return CacheWriter(out, feature_dim=feature_dim, adopt=adopt, **writer_args)
    message: list = [None]
    writer = None
    barrier()  # every rank has checked the target (check_target refuses a live staging folder) before it exists
    if get_rank() == 0:
        try:
            writer = CacheWriter(out, feature_dim=feature_dim, adopt=adopt, **writer_args)
            message = [("ok", str(writer.staging))]
        except LtcacheError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    kind, text = message[0]
    if kind == "error":
        raise LtcacheError(text)
    return writer if writer is not None else CacheWriter(out, feature_dim=feature_dim, staging=Path(text),
                                                         **writer_args)


def merge_split(writer: CacheWriter, split: str, entry: dict, label_counts: np.ndarray, finished: dict, rows: int,
                shards: int) -> None:
    """Every process's new shards and label counts (metadata, never features), and the shards kept from an
    interrupted run, become the split's manifest entry on rank 0: shards in index order, every one present."""
    parts: list = [None] * get_world_size()
    mine = (entry["shards"], np.asarray(label_counts, dtype=np.int64))
    if get_world_size() > 1:
        dist.all_gather_object(parts, mine)
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
    import re

    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(item, dict):
        return None
    split, shard, file, rows, labels = (item.get(key) for key in ("split", "shard", "file", "rows", "labels"))
    counts_ok = isinstance(labels, list) and all(type(v) is int and v >= 0 for v in labels)
    if not (isinstance(split, str) and re.fullmatch(r"[a-z_]+", split) and type(shard) is int and shard >= 0
            and file == f"{split}/{shard:05d}.h5" and type(rows) is int and rows >= 0 and counts_ok
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
        dist.broadcast_object_list(result, src=0)
    return result[0]
