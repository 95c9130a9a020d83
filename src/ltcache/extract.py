"""Run a trained backbone in eval mode over train, val and test, and write the feature cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ltcache.cache import CacheWriter
from ltcache.checkpoint import CHECKPOINT_FORMAT, OFFICIAL, load_model_state, load_weights_into, read_weights
from ltcache.config import EXTRACT
from ltcache.console import log, progress
from ltcache.data import SPLITS, DatasetSpec, build_dataset
from ltcache.errors import LtcacheError
from ltcache.fsutil import sha256_file
from ltcache.models import build_model, check_backbone
from ltcache.params import checked
from ltcache.runtime import command_line, resolve_device
from ltcache.train import images_to


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
    model.to(run_device).eval()
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    writer = CacheWriter(Path(out), feature_dim=model.feature_dim, **writer_args)
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
            split_writer = writer.split(split)
            write_rows(split_writer, data.splits[split], f"extract {split}")
            writer.finish_split(split_writer, len(data.splits[split]))
            log(f"extracted {split}: {len(data.splits[split])} rows x {model.feature_dim}")
        if train_views:
            rows = len(augmented_train)
            views_writer = writer.split("train_views")
            for view in range(train_views):
                torch.manual_seed(int(config.get("seed", 0)) * 1_000_003 + view)  # each view reproducible alone
                write_rows(views_writer, augmented_train, f"extract train view {view + 1}/{train_views}", view * rows)
            writer.finish_split(views_writer, train_views * rows, views=train_views, of="train")
            log(f"extracted {train_views} augmented views of train: {train_views * rows} rows")
        writer.write_joint_head(model.fc.weight, model.fc.bias)
        writer.write_membership(data.source_index)
        backbone = {"arch": config["backbone"], "checkpoint": str(Path(checkpoint).resolve()),
                    "checkpoint_sha256": sha256_file(Path(checkpoint)), "epoch": about["epoch"],
                    "checkpoint_format": about["format"], "command": command_line(),
                    "resolved_config": config}
        return writer.commit(dataset=data.describe(), backbone=backbone)
    except BaseException:
        writer.abort()
        raise
