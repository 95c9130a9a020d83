"""Run a trained backbone in eval mode over train, val and test, and write the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from ltcache.cache import CacheWriter
from ltcache.checkpoint import CHECKPOINT_FORMAT, OFFICIAL, load_model_state, load_weights_into, read_weights
from ltcache.config import EXTRACT
from ltcache.console import log, progress
from ltcache.data import SPLITS, DatasetSpec, build_dataset
from ltcache.distributed import barrier, get_rank, get_world_size
from ltcache.errors import LtcacheError
from ltcache.fsutil import sha256_file
from ltcache.models import build_model, check_backbone
from ltcache.params import checked
from ltcache.runtime import command_line, resolve_device
from ltcache.train import images_to, init_distributed


@checked(*EXTRACT)
def extract(checkpoint: Path, out: Path, *, dataset: str | None = None, backbone: str | None = None,
            root: str | None = None, split_dir: str | None = None, dtype: str = "float32", batch_size: int = 512,
            workers: int = 0, device: str | None = None,
            shard_rows: int = 65536, overwrite: bool = False, train_views: int = 0) -> Path:
    """Write penultimate features, labels and sample indices of every split, plus the joint head, to `out`.

    With train_views K > 0, also a `train_views` split of K augmented views of every train image (the stage-1
    train transform, seeded by the run's seed and the view number): row k * len(train) + i is view k of image i.
    """
    if train_views < 0:
        raise LtcacheError(f"--train-views must be >= 0, got {train_views}")
    weights, about = read_weights(checkpoint)
    if about["format"] == CHECKPOINT_FORMAT:
        for name, value in (("--dataset", dataset), ("--backbone", backbone)):
            if value is not None:
                raise LtcacheError(f"{checkpoint} is an ltcache checkpoint, which records its own dataset and "
                                   f"backbone; drop {name}")
        config, described = about["config"], about["dataset"]
    else:
        if dataset is None or backbone is None:
            raise LtcacheError(f"{checkpoint} is a {OFFICIAL} checkpoint, which records neither its dataset nor its "
                               "architecture; pass --dataset, --backbone and --root (e.g. --dataset imagenet-lt "
                               "--backbone resnext50_32x4d --root /data/imagenet)")
        check_backbone(backbone)
        config = {"backbone": backbone, "seed": 0, "source": OFFICIAL}
        described = {"name": dataset}
    spec = DatasetSpec.from_dict(described, root=root, split_dir=split_dir)
    inputs = [checkpoint, spec.root, spec.split_dir]  # the cache folder may not hold what it is made from
    writer_args = {"dtype": dtype, "shard_rows": shard_rows, "overwrite": overwrite, "inputs": inputs}
    CacheWriter.check_target(Path(out), **writer_args)
    data = build_dataset(spec)
    augmented_train = data.splits["train"]
    data.splits["train"] = augmented_train.with_transform(data.splits["test"].transform)  # test-time transform
    if "train_class_counts" in described and data.class_counts != described["train_class_counts"]:
        raise LtcacheError(f"the dataset under {spec.root} gives train class counts {data.class_counts[:5]}... "
                           f"but the checkpoint was trained on {described['train_class_counts'][:5]}...; "
                           "pass the --root the backbone was trained on")
    model = build_model(config["backbone"], data.num_classes, data.in_channels)
    if about["format"] == CHECKPOINT_FORMAT:
        load_model_state(model, weights, checkpoint, config["backbone"])
    else:  # names the first key that does not map
        load_weights_into(model, weights, checkpoint, config["backbone"])
    run_device = resolve_device(device)
    init_distributed(run_device)  # under torchrun: one process group, every rank extracts its own slice
    if get_world_size() > 1 and train_views:
        raise LtcacheError("--train-views is not supported under torchrun yet (the views' random augmentations "
                           "would differ from a single process); extract them in one process")
    model.to(run_device).eval()
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    writer = open_writer(Path(out), model.feature_dim, writer_args)
    rank, world = get_rank(), get_world_size()
    loader_args = {"batch_size": batch_size, "shuffle": False, "num_workers": workers,
                   "pin_memory": run_device.type == "cuda"}

    def write_rows(split_writer, dataset, label: str, offset: int = 0) -> None:
        loader = DataLoader(dataset, generator=torch.Generator().manual_seed(torch.initial_seed()), **loader_args)
        with torch.inference_mode():
            for images, labels, index in progress(loader, label=label, length=len(loader)):
                features = model.backbone(images_to(images, run_device)).float()
                split_writer.add(features.cpu().numpy(), labels.numpy(), index.numpy() + offset)

    try:
        for split in (name for name in SPLITS if name in data.splits):
            dataset = data.splits[split]
            if world == 1:
                split_writer = writer.split(split)
                write_rows(split_writer, dataset, f"extract {split}")
                writer.finish_split(split_writer, len(dataset))
            else:  # a contiguous slice per rank, its own shards; rank 0 lists them all in the manifest
                first, count = rank_slice(len(dataset), rank, world)
                split_writer = writer.split(split, prefix=f"r{rank:03d}-")
                write_rows(split_writer, Subset(dataset, range(first, first + count)), f"extract {split}")
                merge_split(writer, split, split_writer.close(count, first=first), split_writer.label_counts,
                            len(dataset))
            log(f"extracted {split}: {len(dataset)} rows x {model.feature_dim}")
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
        writer.write_joint_head(model.fc.weight, model.fc.bias)
        writer.write_membership(data.source_index)
        backbone = {"arch": config["backbone"], "checkpoint": str(Path(checkpoint).resolve()),
                    "checkpoint_sha256": sha256_file(Path(checkpoint)), "epoch": about["epoch"],
                    "checkpoint_format": about["format"], "command": command_line(),
                    "resolved_config": config}
        path = writer.commit(dataset=data.describe(), backbone=backbone)
        barrier()
        return path
    except BaseException:
        writer.abort()
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def rank_slice(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows [first, first + count) that `rank` of `world` extracts (sizes differ by at most one)."""
    base, extra = divmod(rows, world)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


def open_writer(out: Path, feature_dim: int, writer_args: dict) -> CacheWriter:
    """Rank 0 makes the staging folder; under torchrun the other ranks write their shards into it (its path is
    broadcast, or rank 0's error, so that no rank waits on a folder that was never made)."""
    if get_world_size() == 1:
        return CacheWriter(out, feature_dim=feature_dim, **writer_args)
    message: list = [None]
    writer = None
    barrier()  # every rank has checked the target (check_target refuses a live staging folder) before it exists
    if get_rank() == 0:
        try:
            writer = CacheWriter(out, feature_dim=feature_dim, **writer_args)
            message = [("ok", str(writer.staging))]
        except LtcacheError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    kind, text = message[0]
    if kind == "error":
        raise LtcacheError(text)
    return writer if writer is not None else CacheWriter(out, feature_dim=feature_dim, staging=Path(text),
                                                         **writer_args)


def merge_split(writer: CacheWriter, split: str, entry: dict, label_counts: np.ndarray, rows: int) -> None:
    """Every rank's shard list and label counts (metadata, never features) to rank 0, which records the split."""
    parts: list = [None] * get_world_size()
    dist.all_gather_object(parts, (entry["rows"], entry["shards"], np.asarray(label_counts, dtype=np.int64)))
    if get_rank() != 0:
        return
    if sum(part[0] for part in parts) != rows:
        raise LtcacheError(f"split {split}: the processes extracted {sum(p[0] for p in parts)} rows, expected {rows}")
    counts = np.zeros(max(len(part[2]) for part in parts), dtype=np.int64)
    for part in parts:
        counts[: len(part[2])] += part[2]
    writer.add_finished(split, {"rows": rows, "shards": [shard for part in parts for shard in part[1]]}, counts)
