"""Stage 1: train a backbone and its linear classifier jointly (Sec. 3 samplers, CE, SGD + cosine to 0)."""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ltcache import __version__
from ltcache.checkpoint import save_checkpoint
from ltcache.config import TrainConfig
from ltcache.console import log, progress
from ltcache.data import build_dataset
from ltcache.data.samplers import EpochSampler, parse_sampler
from ltcache.distributed import barrier, get_rank, get_world_size, is_main_process
from ltcache.errors import LtcacheError
from ltcache.fsutil import append_jsonl, check_output_dir, prepare_output_dir, write_json
from ltcache.losses import build_loss
from ltcache.metrics import evaluate
from ltcache.models import build_model, select_trainable


def resolve_device(name: str | None) -> torch.device:
    """The named device, or CUDA when present (this rank's GPU under torchrun), else the CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LtcacheError(f"--device {name} asked for CUDA but no GPU is visible; drop --device or use cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (no GradScaler needed), a no-op elsewhere; covers the forward pass and the loss."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def images_to(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; channels_last on CUDA, where convolutions run faster in that layout."""
    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = peak * (1 + cos(pi * step / total)) / 2: step 0 uses the peak, and it reaches 0 after the end."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over a loader, in eval mode."""
    model.eval()
    predictions, labels = [], []
    for images, targets, _ in loader:
        with autocast():
            logits = model(images_to(images, device))
        predictions.append(logits.argmax(1).cpu())
        labels.append(targets)
    return torch.cat(predictions), torch.cat(labels)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, autocast, *, epoch: int) -> float:
    model.train()
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(epoch)  # deferred re-weighting switches on at its epoch
    total, count = 0.0, 0
    for step, (images, targets, _) in enumerate(progress(loader, label=f"epoch {epoch + 1}", length=len(loader))):
        images, targets = images_to(images, device), targets.to(device, non_blocking=True)
        with autocast():
            loss = criterion(model(images), targets)
        if not torch.isfinite(loss):
            raise LtcacheError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                               "lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(targets)
        count += len(targets)
    return total / max(count, 1)


def fit(cfg: TrainConfig) -> Path:
    """Train a backbone + linear head; write config.json, metrics.jsonl and checkpoint.pt into `cfg.out`."""
    cfg = cfg.resolved()
    cfg.validate()
    device = resolve_device(cfg.device)
    init_distributed(device)
    data = build_dataset(cfg.dataset_spec())
    out = Path(cfg.out)
    check_output_dir(out, overwrite=cfg.overwrite, what="run folder")  # every rank fails alike, none hangs
    barrier()
    if is_main_process():
        prepare_output_dir(out, overwrite=cfg.overwrite, what="run folder")
    barrier()
    try:
        return _train(cfg, data, out, device)
    except LtcacheError:
        # A bad image or a diverging loss before the first checkpoint: leave nothing behind.
        if is_main_process() and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if get_world_size() > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data, out: Path, device: torch.device) -> Path:
    rank, world = get_rank(), get_world_size()
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.backbone, data.num_classes, data.in_channels, pretrained=cfg.pretrained).to(device)
    trainable = select_trainable(model, cfg.trainable)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    sampler = EpochSampler(data.labels["train"], parse_sampler(cfg.sampler), total_epochs=cfg.epochs, seed=cfg.seed,
                           rank=rank, world=world, samples_per_class=cfg.samples_per_class)
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda",
                   "persistent_workers": cfg.workers > 0}
    # batch_size is the global batch (the paper's 512), split evenly across torchrun ranks.
    if cfg.batch_size % world:
        raise LtcacheError(f"--batch-size {cfg.batch_size} does not split evenly across {world} processes")
    rank_batch = cfg.batch_size // world
    # BatchNorm cannot train on a batch of one: drop a trailing single-sample batch, and only that.
    drop_last = len(sampler) % rank_batch == 1 and len(sampler) > 1
    train_loader = DataLoader(data.splits["train"], batch_size=rank_batch, sampler=sampler, drop_last=drop_last,
                              **loader_args)
    val_loader = DataLoader(data.splits["val"], batch_size=512, shuffle=False, **loader_args) \
        if "val" in data.splits else None
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        trained = torch.compile(trained)
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.epochs * len(train_loader))
    autocast = autocast_for(device)
    criterion = build_loss(cfg.loss, data.class_counts, cfg.loss_params).to(device)

    resolved = {**cfg.to_dict(), "world_size": world, "device": str(device), "ltcache_version": __version__}
    dataset = data.describe()
    if is_main_process():
        write_json(out / "config.json", {"config": resolved, "dataset": dataset})
    log(f"training {cfg.backbone} on {cfg.dataset} ({len(data.labels['train'])} train images, "
        f"{data.num_classes} classes) with {cfg.sampler} sampling on {device}, {cfg.epochs} epochs")
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]
        loss = train_one_epoch(trained, train_loader, criterion, optimizer, scheduler, device, autocast, epoch=epoch)
        if is_main_process():
            record = {"epoch": epoch + 1, "loss": round(loss, 6), "lr": lr}
            if val_loader is not None:
                val = evaluate(*predict(model, val_loader, device, autocast), data.class_counts)
                record.update(val_top1=round(val["all"], 3), val_mean_per_class=round(val["mean_per_class"], 3))
            record["seconds"] = round(time.perf_counter() - start, 3)
            append_jsonl(out / "metrics.jsonl", record)
            val_text = f"  val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  lr {lr:.4g}{val_text}")
            save_checkpoint(out / "checkpoint.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                            epoch=epoch + 1, config=resolved, dataset=dataset)
        barrier()
    return out
