"""Run a trained backbone in eval mode over train, val and test, and write the feature cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ltcache.cache.journal import PLAN, find_interrupted, journalled_shards, merge_split, rank_slice
from ltcache.cache.writer import CacheWriter, open_writer
from ltcache.core.console import log, progress
from ltcache.core.distributed import barrier, get_rank, get_world_size, process_group
from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import sha256_file
from ltcache.core.options import SHARD_ROWS
from ltcache.core.params import checked
from ltcache.core.runtime import command_line, images_to, resolve_device
from ltcache.data import SPLITS, DatasetSpec, build_dataset
from ltcache.stage1.checkpoint import CHECKPOINT_FORMAT, OFFICIAL, load_model_state, load_weights_into, read_weights
from ltcache.stage1.config import EXTRACT
from ltcache.stage1.hub import build_frozen, check_frozen, describe_frozen, split_name
from ltcache.stage1.models import build_model, check_backbone
from ltcache.stage1.preprocessing import CROP_EXPAND, TEST_CROPS, test_views


@dataclass
class Source:
    """What an extract runs, resolved from one of its three modes (an ltcache checkpoint, an official
    classifier-balancing checkpoint, or a library model extracted as it is): the dataset spec, the checkpoint's
    weights, its run config and what the manifest records of the model."""

    checkpoint: Path | None
    spec: DatasetSpec
    described: dict  # the dataset as the checkpoint recorded it (train class counts), or just its name
    config: dict  # the run's resolved config: backbone, seed, where the weights come from
    weights: dict | None
    about: dict  # the checkpoint's format and epoch
    model: dict | None = None  # without a checkpoint: library, weights, preprocessing (hub.describe_frozen)

    @property
    def backbone(self) -> str:
        return self.config["backbone"]


@checked(*EXTRACT)
def extract(checkpoint: Path | None, out: Path, *, dataset: str | None = None, backbone: str | None = None,
            pretrained: bool = False, root: str | None = None, split_dir: str | None = None, dtype: str = "float32",
            batch_size: int = 512, workers: int = 0, device: str | None = None, shard_rows: int = SHARD_ROWS.default,
            overwrite: bool = False, train_views: int = 0, resume: bool = False, joint_head: str = "auto",
            zero_shot: bool = False, class_names: Path | None = None, templates: str = "openai",
            features: str = "auto", test_crops: int = 0, crop_expand: int = CROP_EXPAND,
            image_column: str | None = None, label_column: str | None = None,
            val_per_class: int | None = None) -> Path:
    """Write penultimate features, labels and sample indices of every split, plus the joint head, to `out`.

    `checkpoint` None extracts `backbone` as it is (hub.py): a torchvision model or ltcache backbone, `timm:<name>`
    or `open_clip:<arch>/<tag>`, with pretrained weights (`pretrained`) or random ones. A library's backbone, and
    any pretrained one, is fed its library's own preprocessing (grayscale replicated to RGB); an ltcache or
    torchvision backbone with random weights gets the dataset's test transform. The joint head (`joint_head`) is
    the model's own classifier when its classes are the dataset's (`auto`) or when asked (`own`), else an
    instance-balanced linear probe fitted on the cached train features. `zero_shot` (CLIP) also stores a text head
    built from the class names (`class_names` file, else the dataset's) and prompt `templates` (openai, simple or a
    file). `features` chooses what a library backbone gives (FEATURE_KINDS: DINOv2's class + patch tokens of a timm
    ViT, CLIP's features before its projection, or those with the projection kept for the text head). The manifest
    records the library, the model, the weights, the preprocessing, the features and the heads' sources.

    With train_views K > 0, also a `train_views` split of K augmented views of every train image (the stage-1
    train transform, seeded by the run's seed and the view number): row k * len(train) + i is view k of image i.
    With test_crops K > 0, also `val_crops` and `test_crops`, K fixed views of every val and test image in the same
    layout (preprocessing.test_views: the view and its mirror, or LIFT's five / ten crops), for compare --tta; they
    are sharded, journalled and resumed like the other splits.

    Shard k of a split holds sample indices [k * shard_rows, (k + 1) * shard_rows), whichever process writes it, so
    the cache is the same under any number of torchrun processes. Each finished shard is journalled in the staging
    folder; with `resume`, a killed extract's staging folder is continued: the shards whose journal line and sha256
    agree are kept and only the others are extracted.
    """
    if train_views < 0:
        raise LtcacheError(f"--train-views must be >= 0, got {train_views}")
    if test_crops not in TEST_CROPS:
        test_views(test_crops, None, None)  # the one-line error naming the geometries
    checkpoint = run_checkpoint(checkpoint)
    source = resolve_source(checkpoint, dataset=dataset, backbone=backbone, pretrained=pretrained, root=root,
                            split_dir=split_dir, joint_head=joint_head, zero_shot=zero_shot, templates=templates,
                            train_views=train_views, features=features,
                            columns={"image_column": image_column, "label_column": label_column,
                                     "val_per_class": val_per_class})
    inputs = [checkpoint, source.spec.root, source.spec.split_dir]  # the cache may not hold what it is made from
    writer_args = {"dtype": dtype, "shard_rows": shard_rows, "overwrite": overwrite, "inputs": inputs,
                   "source": {"dataset": source.spec.name, "backbone": source.backbone}}
    CacheWriter.check_target(Path(out), **writer_args)
    plan = {"checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint is not None else None,
            "model": source.model, "dtype": dtype, "shard_rows": shard_rows, "train_views": train_views,
            "features": features, "test_crops": test_crops, "crop_expand": crop_expand if test_crops > 2 else None,
            "dataset": source.spec.to_dict(),
            # eval-mode features do not depend on the batch in exact arithmetic, but BLAS and cuDNN pick kernels by
            # shape, so two batch sizes give features that differ in the last bits: one cache, one batch size
            "batch_size": batch_size}
    adopt = find_interrupted(Path(out), plan) if resume else None
    data, augmented_train = load_splits(source)
    model, frozen = build_source_model(source, data, pretrained=pretrained, joint_head=joint_head,
                                       zero_shot=zero_shot, class_names=class_names, templates=templates,
                                       device=device, features=features)
    crops = add_test_crops(data, frozen, test_crops, crop_expand) if test_crops else None
    run_device = resolve_device(device)
    with process_group(run_device):  # under torchrun: every rank extracts its own shards
        if (get_world_size() > 1 or resume) and train_views:
            raise LtcacheError("--train-views is not supported under torchrun or with --resume yet (the views' random "
                               "augmentations would differ from one uninterrupted process); extract them in one "
                               "process")
        model.to(run_device).eval()
        if run_device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        writer = open_writer(Path(out), model.feature_dim, writer_args, adopt=adopt)
        rows = RowWriter(model, run_device, batch_size=batch_size, workers=workers)
        try:
            write_splits(writer, rows, data, plan, shard_rows=shard_rows, batch_size=batch_size)
            if train_views:
                write_views(writer, rows, augmented_train, train_views, seed=int(source.config.get("seed", 0)))
            if get_rank() != 0:
                barrier()  # rank 0 commits; the cache exists when every rank returns
                return Path(out)
            path = commit(writer, source, data, model, frozen, plan, crops)
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


def run_checkpoint(checkpoint: Path | None) -> Path | None:
    """A train-backbone run folder stands for its checkpoint.pt; any other folder is an error saying what to pass."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return checkpoint
    inside = Path(checkpoint) / "checkpoint.pt"
    if inside.is_file():
        return inside
    raise LtcacheError(f"{checkpoint} is a folder without a checkpoint.pt; pass a train-backbone run folder (or its "
                       "checkpoint.pt), or an official classifier-balancing .pth file")


def resolve_source(checkpoint: Path | None, *, dataset: str | None, backbone: str | None, pretrained: bool,
                   root: str | None, split_dir: str | None, joint_head: str, zero_shot: bool, templates: str,
                   train_views: int, features: str = "auto", columns: dict | None = None) -> Source:
    """Which of the three modes this extract is, its options checked for that mode before anything is read beyond
    the checkpoint (no dataset, no weight downloaded)."""
    if checkpoint is None:
        if dataset is None or backbone is None:
            raise LtcacheError("without a checkpoint, pass --backbone and --dataset (e.g. --backbone resnet50 "
                               "--pretrained --dataset imagefolder --root /data/images)")
        check_frozen(backbone, pretrained, joint_head=joint_head, zero_shot=zero_shot, templates=templates,
                     features=features)
        if train_views and (pretrained or split_name(backbone)[0] is not None):  # before any weight is fetched
            raise LtcacheError("--train-views augments with the dataset's own transform, not this backbone's "
                               "preprocessing; drop --train-views")
        model = describe_frozen(backbone, pretrained)
        config = {"backbone": backbone, "seed": 0, "source": model["weights"] or "random weights"}
        return Source(None, DatasetSpec.from_dict({"name": dataset}, root=root, split_dir=split_dir, **(columns or {})),
                      {"name": dataset}, config, None, {"format": "none", "epoch": None}, model)
    if pretrained or zero_shot or joint_head != "auto" or features != "auto":
        flag = "--pretrained" if pretrained else "--zero-shot" if zero_shot else "--joint-head" \
            if joint_head != "auto" else "--features"
        raise LtcacheError(f"{flag} is for extracting a --backbone without a checkpoint; {checkpoint} brings its own "
                           f"weights and classifier, so drop {flag}")
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
        config, described = {"backbone": backbone, "seed": 0, "source": OFFICIAL}, {"name": dataset}
    if (columns or {}).get("val_per_class") is not None:
        raise LtcacheError(f"{checkpoint} records the split it was trained on; drop --val-per-class")
    spec = DatasetSpec.from_dict(described, root=root, split_dir=split_dir,
                                 **{k: v for k, v in (columns or {}).items() if k != "val_per_class"})
    return Source(checkpoint, spec, described, config, weights, about)


def load_splits(source: Source):
    """The dataset's splits, every one with the test-time transform, and the train split as stage 1 augments it
    (for --train-views); the train class counts must be the ones the checkpoint was trained on."""
    data = build_dataset(source.spec)
    augmented_train = data.splits["train"]
    data.splits["train"] = augmented_train.with_transform(data.splits["test"].transform)  # test-time transform
    if "train_class_counts" in source.described and data.class_counts != source.described["train_class_counts"]:
        raise LtcacheError(f"the dataset under {source.spec.root} gives train class counts {data.class_counts[:5]}... "
                           f"but the checkpoint was trained on {source.described['train_class_counts'][:5]}...; "
                           "pass the --root the backbone was trained on")
    return data, augmented_train


def build_source_model(source: Source, data, *, pretrained: bool, joint_head: str, zero_shot: bool,
                       class_names: Path | None, templates: str, device: str | None, features: str = "auto"):
    """(model, frozen): the checkpoint's model, or a library model as it is (hub.Frozen: its own preprocessing,
    classifier and text head; the dataset's splits then get the library's transform)."""
    if source.checkpoint is not None:
        return load_checkpoint_model(source, data), None
    torch.manual_seed(int(source.config["seed"]))  # random weights (and the text tower's) alike in every run
    frozen = build_frozen(source.backbone, pretrained, num_classes=data.num_classes, in_channels=data.in_channels,
                          class_names=data.class_names, joint_head=joint_head, zero_shot=zero_shot,
                          names_file=class_names, templates=templates, device=resolve_device(device),
                          features=features)
    model, source.model = frozen.classifier, {**source.model, **frozen.about}
    if frozen.transform is not None:  # the library's own resize, crop, mean and std, not the dataset's
        for split in list(data.splits):
            data.splits[split] = data.splits[split].with_transform(frozen.transform)
    return model, frozen


def load_checkpoint_model(source: Source, data):
    """The checkpoint's backbone and classifier for the dataset's classes and channels."""
    model = build_model(source.backbone, data.num_classes, data.in_channels)
    if source.about["format"] == CHECKPOINT_FORMAT:
        load_model_state(model, source.weights, source.checkpoint, source.backbone)
    else:  # names the first key that does not map
        load_weights_into(model, source.weights, source.checkpoint, source.backbone)
    return model


class RowWriter:
    """Runs the backbone over a dataset, in eval mode without gradients, and hands its rows to a split writer."""

    def __init__(self, model, device: torch.device, *, batch_size: int, workers: int):
        self.model, self.device, self.workers = model, device, workers
        self.loader_args = {"batch_size": batch_size, "shuffle": False, "num_workers": workers,
                            "pin_memory": device.type == "cuda"}

    def write(self, split_writer, dataset, label: str, offset: int = 0, batches: list[list[int]] | None = None,
              total: int | None = None):
        """Every row of `dataset` (or of `batches`, lists of indices that never cross a shard, so each shard's rows
        are computed alike in any run, resumed or split), its index shifted by `offset`. On a terminal, a bar of
        images, images/s and time left; under torchrun, rank 0 shows the global count of `total` rows (its own
        times the processes, which take equal shares of whole shards)."""
        world = get_world_size()
        if batches is None:
            loader = DataLoader(dataset, generator=torch.Generator().manual_seed(torch.initial_seed()),
                                **self.loader_args)
        else:
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                pin_memory=self.device.type == "cuda")
        with torch.inference_mode():
            for images, labels, index in progress(loader, label=label, unit="images",
                                                  per_item=lambda batch: len(batch[1]) * world,
                                                  total_units=total if total is not None else len(dataset)):
                features = self.model.backbone(images_to(images, self.device)).float()
                split_writer.add(features.cpu().numpy(), labels.numpy(), index.numpy() + offset)


class StackedViews(torch.utils.data.Dataset):
    """K views of every image of a split, row k * n + i being view k of image i (each view a dataset of the same
    images with its own transform): what the *_crops splits hold. Returns (image, label, row)."""

    def __init__(self, views: list):
        self.views, self.count = views, len(views[0])

    def __len__(self) -> int:
        return len(self.views) * self.count

    def __getitem__(self, row: int):
        view, index = divmod(row, self.count)
        image, label, _ = self.views[view][index]
        return image, label, row


CROP_SPLITS = {"val_crops": "val", "test_crops": "test"}


def add_test_crops(data, frozen, count: int, expand: int) -> dict:
    """`val_crops` and `test_crops` (StackedViews of the split's test-time views, preprocessing.test_views) added to
    the splits to extract; returns the geometry, which the manifest records as test_crops."""
    preprocessing = frozen.preprocessing if frozen is not None else None
    about = None
    for name, of in CROP_SPLITS.items():
        if of not in data.splits:
            continue
        base = data.splits[of]
        transforms, about = test_views(count, preprocessing, base.transform, expand)
        data.splits[name] = StackedViews([base.with_transform(transform) for transform in transforms])
    return about


def write_splits(writer: CacheWriter, rows: RowWriter, data, plan: dict, *, shard_rows: int, batch_size: int) -> None:
    """Every split's shards that this rank takes and an interrupted run did not finish, then the split's manifest
    entry merged from every rank's shards on rank 0."""
    rank, world = get_rank(), get_world_size()
    done = journalled_shards(writer.staging, plan)  # {} for a new extract, which records its plan
    for split in (name for name in (*SPLITS, *CROP_SPLITS) if name in data.splits):
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
        indices = np.asarray([i for batch in batches for i in batch], dtype=np.int64)
        split_writer = writer.split(split, shard_ids=todo, journal=writer.staging / f"journal-r{rank:03d}.jsonl")
        begin = time.perf_counter()
        left = len(dataset) - sum(min(shard_rows, len(dataset) - k * shard_rows) for k in finished)
        if batches:
            rows.write(split_writer, dataset, f"extract {split}", batches=batches, total=left)
        entry = split_writer.close(len(dataset), expected_index=indices)
        merge_split(writer, split, entry, split_writer.label_counts, finished, len(dataset), shards)
        if split in CROP_SPLITS and get_rank() == 0:
            writer.splits[split].update(views=len(dataset.views), of=CROP_SPLITS[split])
        seconds = time.perf_counter() - begin
        log(f"extracted {split}: {len(dataset)} rows x {rows.model.feature_dim} in {seconds:.1f} s"
            + (f" ({left / seconds:,.0f} images/s)" if left and seconds > 0 else "")
            + (f" ({len(finished)} of {shards} shards kept from the interrupted run)" if finished else ""))


def write_views(writer: CacheWriter, rows: RowWriter, augmented_train, views: int, *, seed: int) -> None:
    """`views` augmented views of every train image: row k * len(train) + i is view k of image i."""
    count = len(augmented_train)
    views_writer = writer.split("train_views")
    for view in range(views):
        torch.manual_seed(seed * 1_000_003 + view)  # each view reproducible alone
        rows.write(views_writer, augmented_train, f"extract train view {view + 1}/{views}", view * count)
    writer.finish_split(views_writer, views * count, views=views, of="train")
    log(f"extracted {views} augmented views of train: {views * count} rows")


def commit(writer: CacheWriter, source: Source, data, model, frozen, plan: dict, crops: dict | None = None) -> Path:
    """Rank 0: the joint head (the checkpoint's, the library model's own, or a linear probe), the text head, the
    membership and the manifest, written last: the cache exists from here on."""
    for bookkeeping in [writer.staging / PLAN, *writer.staging.glob("journal-r*.jsonl")]:
        bookkeeping.unlink()  # the manifest is the cache's record from here on
    model_source = source.model
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
        writer.write_text_head(frozen.text, frozen.projection)
    writer.write_membership(data.source_index)
    checkpoint = source.checkpoint
    backbone = {"arch": source.backbone,
                "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                "checkpoint_sha256": plan["checkpoint_sha256"], "epoch": source.about["epoch"],
                "checkpoint_format": source.about["format"], "command": command_line(),
                "resolved_config": source.config, **({"model": model_source} if model_source else {})}
    return writer.commit(dataset=data.describe(), backbone=backbone, test_crops=crops)


def probe_on_written(writer: CacheWriter, num_classes: int):
    """The linear probe (import_features.linear_probe) fitted on the train rows already written to the staging
    folder."""
    from ltcache.stage1.import_features import linear_probe

    features, labels = writer.read_split("train")
    return linear_probe(torch.from_numpy(features), torch.from_numpy(labels), num_classes, seed=0)
