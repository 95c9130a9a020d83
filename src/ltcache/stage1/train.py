"""Stage 1: train a backbone and its linear classifier jointly (Sec. 3 samplers, CE, SGD + cosine to 0)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ltcache._version import __version__
from ltcache.core.console import duration, log, progress
from ltcache.core.distributed import barrier, get_rank, get_world_size, is_main_process, process_group
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import RUN, StagedFolder, check_target, hold_exclusive, is_locked, made_by_ltcache, recover
from ltcache.core.fsutil import append_jsonl, atomic_write, sha256_file, write_json
from ltcache.core.runtime import command_line, cosine_schedule, images_to, resolve_device, seed_everything
from ltcache.core.tensorboard import require_tensorboard, summary_writer
from ltcache.data import build_dataset
from ltcache.data.samplers import EpochSampler, parse_sampler
from ltcache.metrics import evaluate
from ltcache.stage1.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_weights_into,
    read_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ltcache.stage1.config import TrainConfig
from ltcache.stage1.losses import build_loss
from ltcache.stage1.models import build_model, select_trainable


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (no GradScaler needed), a no-op elsewhere; covers the forward pass and the loss."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


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


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, autocast, *, epoch: int,
                    on_step=None, world: int = 1) -> tuple[float, int]:
    """One epoch; (mean loss, images this process trained on). `on_step(step, loss, lr)` after each step (the
    TensorBoard writer). The in-epoch bar on a terminal counts every process's images (this one's times `world`)."""
    model.train()
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(epoch)  # deferred re-weighting switches on at its epoch
    total, count = 0.0, 0
    batches = progress(loader, label=f"epoch {epoch + 1}", unit="images", per_item=lambda batch: len(batch[1]) * world,
                       total_units=len(loader.sampler) * world if hasattr(loader.sampler, "__len__") else None)
    for step, (images, targets, _) in enumerate(batches):
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
        if on_step is not None:
            on_step(step, loss.item(), scheduler.get_last_lr()[0])
    return total / max(count, 1), count


def fit(cfg: TrainConfig, *, inputs=()) -> Path:
    """Train a backbone + linear head; write config.json, metrics.jsonl and checkpoint.pt into `cfg.out`.

    The run is built in a staging folder beside `cfg.out` and moved into place once its first checkpoint exists;
    with `overwrite`, an existing run is swapped out only then. A run that fails or is killed before its first
    checkpoint leaves nothing at `cfg.out`. `inputs` (the recipe file) may not lie inside `cfg.out`.
    """
    init = None
    if cfg.init is not None:  # read first: an ltcache checkpoint names the backbone the run must use
        weights, about = read_weights(Path(cfg.init))
        if cfg.backbone is None and about["arch"] is None:
            raise LtcacheError(f"--init {cfg.init} is a {about['format']} checkpoint, which does not record its "
                               "architecture; pass --backbone (resnet10, resnext50_32x4d or resnext152_32x4d)")
        if cfg.backbone is not None and about["arch"] not in (None, cfg.backbone):
            raise LtcacheError(f"--init {cfg.init} holds a {about['arch']}, not the --backbone {cfg.backbone}; drop "
                               "--backbone or pass the matching one")
        cfg = replace(cfg, backbone=cfg.backbone or about["arch"], init=str(Path(cfg.init).resolve()))
        init = {"weights": weights, "format": about["format"], "sha256": sha256_file(Path(cfg.init))}
    cfg = cfg.resolved()
    if cfg.tensorboard:
        require_tensorboard()  # before anything is trained or written
    cfg.validate()
    out = Path(cfg.out)
    inputs = [*inputs, cfg.data.root, cfg.data.split_dir, cfg.init]
    device = resolve_device(cfg.device)
    with process_group(device):
        source = {"dataset": cfg.data.name, "backbone": cfg.backbone}
        check_target(out, kind=RUN, overwrite=cfg.overwrite, inputs=inputs, source=source)  # every rank alike
        barrier()  # every rank has checked before rank 0 creates anything beside the target
        data = build_dataset(cfg.data)
        staged = None
        if is_main_process():
            staged = StagedFolder(out, kind=RUN, overwrite=cfg.overwrite, inputs=inputs, source=source)
        try:
            return _train(cfg, data, RunFolder(staged, out), device, init=init)
        except BaseException:
            if staged is not None:
                staged.abort()  # removes the staging folder unless the run was already published
            raise
        finally:
            if staged is not None:
                staged.close()


def resume(run: Path, *, device: str | None = None, workers: int | None = None) -> Path:
    """Continue a killed run from its last checkpoint: model, optimizer, schedule position and every process's
    random-number state, so that on the CPU the final checkpoint equals an uninterrupted run's, tensor by tensor.
    The run's own resolved config is used; only `device` and `workers` may change."""
    run = Path(run)
    if not run.exists():
        recover(run, RUN)  # a swap interrupted between its two renames
    if not made_by_ltcache(run, RUN) or not (run / "checkpoint.pt").is_file():
        raise LtcacheError(f"{run} is not an ltcache run folder with a checkpoint.pt; pass the --out of a "
                           "train-backbone run that wrote at least one checkpoint")
    state = load_checkpoint(run / "checkpoint.pt")
    cfg = replace(TrainConfig.from_dict(state["config"]), out=str(run), overwrite=False,
                  **({"device": device} if device else {}), **({"workers": workers} if workers is not None else {}))
    cfg.validate()
    if state["epoch"] >= cfg.epochs:
        log(f"{run} already finished all {cfg.epochs} epochs; nothing to resume")
        return run
    run_device = resolve_device(cfg.device)
    with process_group(run_device):
        busy = f"run folder {run} is being trained by another ltcache process; wait for it to finish"
        if is_locked(run):  # checked on every rank before rank 0 takes the lock itself
            raise LtcacheError(busy)
        barrier()
        lock = hold_exclusive(run, busy) if is_main_process() else None
        try:
            data = build_dataset(cfg.data)
            if data.class_counts != state["dataset"].get("train_class_counts"):
                raise LtcacheError(f"the dataset now gives train class counts {data.class_counts[:5]}... but {run} was "
                                   f"trained on {state['dataset'].get('train_class_counts', [])[:5]}...; restore the "
                                   "dataset the run started with")
            return _train(cfg, data, RunFolder(None, run, published=True), run_device, start=state)
        finally:
            if lock is not None:
                os.close(lock)


class RunFolder:
    """Where the run's files go: the staging folder until the first checkpoint is published, then the run folder."""

    def __init__(self, staged: StagedFolder | None, target: Path, *, published: bool = False):
        self.staged, self.target, self.published = staged, target, published

    @property
    def path(self) -> Path:
        return self.staged.path if self.staged is not None and not self.published else self.target

    def publish(self) -> None:
        if not self.published and self.staged is not None:
            self.staged.publish()
        self.published = True


def _train(cfg: TrainConfig, data, folder: RunFolder, device: torch.device, *, start: dict | None = None,
           init: dict | None = None) -> Path:
    """The training loop. `start` is a loaded checkpoint to continue from (resume); `init` the starting weights of a
    fine-tuning run (--init: weights, format, sha256)."""
    rank, world = get_rank(), get_world_size()
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.backbone, data.num_classes, data.in_channels, pretrained=cfg.pretrained)
    if init is not None:
        load_weights_into(model, init["weights"], Path(cfg.init), cfg.backbone)
    model = model.to(device)
    trainable = select_trainable(model, cfg.trainable)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    sampler, loader_generator, train_loader, val_loader = _loaders(cfg, data, device, rank, world)
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.epochs * len(train_loader))
    first_epoch = 0
    if start is not None:
        load_model_state(model, start["model"], folder.target / "checkpoint.pt", cfg.backbone)
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        first_epoch = start["epoch"]
        restore_rng(start.get("rng", []), folder.target)
        if is_main_process():
            keep_epochs(folder.target / "metrics.jsonl", first_epoch)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        trained = torch.compile(trained)
    autocast = autocast_for(device)
    criterion = build_loss(cfg.loss, data.class_counts, cfg.loss_params).to(device)

    resolved = {**cfg.to_dict(), "world_size": world, "device": str(device), "ltcache_version": __version__,
                "command": command_line()}
    if init is not None:
        resolved.update(init_format=init["format"], init_sha256=init["sha256"])
    if start is not None:
        resolved = {**start["config"], "device": str(device), "workers": cfg.workers}
    dataset = data.describe()
    if is_main_process() and start is None:
        write_json(folder.path / "config.json", {"config": resolved, "dataset": dataset})
    verb = "resuming" if start is not None else "training"
    log(f"{verb} {cfg.backbone} on {cfg.dataset} ({len(data.labels['train'])} train images, "
        f"{data.num_classes} classes) with {cfg.sampler} sampling on {device}, epochs {first_epoch + 1}-{cfg.epochs}")
    events = EpochEvents(enabled=cfg.tensorboard and is_main_process(), steps=len(train_loader))
    times: list[float] = []
    try:
        for epoch in range(first_epoch, cfg.epochs):
            begin = time.perf_counter()
            sampler.set_epoch(epoch)
            loader_generator.manual_seed(cfg.seed * 1_000_003 + epoch)
            lr = scheduler.get_last_lr()[0]
            loss, images = train_one_epoch(trained, train_loader, criterion, optimizer, scheduler, device, autocast,
                                           epoch=epoch, on_step=events.step_callback(epoch), world=world)
            trained_seconds = time.perf_counter() - begin
            record = {"epoch": epoch + 1, "loss": round(loss, 6), "lr": lr,
                      "images_per_second": round(images * world / max(trained_seconds, 1e-9), 1)}
            if is_main_process() and val_loader is not None:
                val = evaluate(*predict(model, val_loader, device, autocast), data.class_counts)
                record.update(val_top1=round(val["all"], 3), val_mean_per_class=round(val["mean_per_class"], 3))
            rng = gather_rng()  # every rank's state where the next epoch starts
            if is_main_process():
                record["seconds"] = round(time.perf_counter() - begin, 3)
                times.append(record["seconds"])
                append_jsonl(folder.path / "metrics.jsonl", record)
                log(epoch_line(record, cfg.epochs, left=sum(times) / len(times) * (cfg.epochs - epoch - 1)))
                save_checkpoint(folder.path / "checkpoint.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch + 1, config=resolved, dataset=dataset, rng=rng)
                folder.publish()  # the first checkpoint exists: the run (and only now) replaces what was at --out
                events.epoch(record, folder.target)
            barrier()
    finally:
        events.close()
    return folder.target


def epoch_line(record: dict, epochs: int, *, left: float) -> str:
    """'epoch 3/40  2.1 s  1,530 images/s  loss 0.5115  lr 0.0226  val top-1 63.00  mean/class 61.20  1 min 10 s
    left': what an epoch took and did, and the time the remaining epochs will take at the mean pace so far."""
    val = (f"  val top-1 {record['val_top1']:.2f}  mean/class {record['val_mean_per_class']:.2f}"
           if "val_top1" in record else "")
    return (f"epoch {record['epoch']}/{epochs}  {record['seconds']:.1f} s  {record['images_per_second']:,.0f} images/s"
            f"  loss {record['loss']:.4f}  lr {record['lr']:.4g}{val}  {duration(left)} left")


class EpochEvents:
    """train-backbone --tensorboard: per step the training loss and lr, per epoch the mean loss, images/s and val
    accuracy, into RUN/tensorboard (rank 0 only; nothing at all when not enabled). The writer is opened in the
    published run folder once its checkpoint exists (it reopens its file by path, so it cannot follow the staging
    folder's move); the steps before that wait in memory."""

    def __init__(self, *, enabled: bool, steps: int):
        self.enabled, self.steps, self.writer = enabled, steps, None
        self.pending: list[tuple[str, float, int]] = []

    def step_callback(self, epoch: int):
        if not self.enabled:
            return None

        def on_step(step: int, loss: float, lr: float) -> None:
            global_step = epoch * self.steps + step + 1
            self.pending += [("train/loss_step", loss, global_step), ("train/lr", lr, global_step)]

        return on_step

    def epoch(self, record: dict, run: Path) -> None:
        """Write the epoch's scalars and the steps before them into RUN/tensorboard (the published run folder)."""
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = summary_writer(Path(run) / "tensorboard")
        for key, tag in (("loss", "train/loss"), ("images_per_second", "train/images_per_second"),
                         ("val_top1", "val/top1"), ("val_mean_per_class", "val/mean_per_class"),
                         ("seconds", "train/epoch_seconds")):
            if key in record:
                self.pending.append((tag, record[key], record["epoch"]))
        for tag, value, step in self.pending:
            self.writer.add_scalar(tag, value, step)
        self.pending.clear()
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _loaders(cfg: TrainConfig, data, device: torch.device, rank: int, world: int):
    """(sampler, generator, train loader, val loader): this rank's share of each epoch's draws, the generator that
    seeds each epoch's worker processes, and the loaders (the val loader None without a val split)."""
    sampler = EpochSampler(data.labels["train"], parse_sampler(cfg.sampler), total_epochs=cfg.epochs, seed=cfg.seed,
                           rank=rank, world=world, samples_per_class=cfg.samples_per_class)
    # Worker processes are started afresh every epoch and seeded from (seed, epoch) through the loader's generator,
    # so an epoch's augmentations do not depend on what ran before it (a resumed run repeats them exactly).
    loader_generator = torch.Generator()
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda"}
    # batch_size is the global batch (the paper's 512), split evenly across torchrun ranks.
    if cfg.batch_size % world:
        raise LtcacheError(f"--batch-size {cfg.batch_size} does not split evenly across {world} processes")
    rank_batch = cfg.batch_size // world
    # BatchNorm cannot train on a batch of one: drop a trailing single-sample batch, and only that.
    drop_last = len(sampler) % rank_batch == 1 and len(sampler) > 1
    train_loader = DataLoader(data.splits["train"], batch_size=rank_batch, sampler=sampler, drop_last=drop_last,
                              generator=loader_generator, **loader_args)
    val_loader = DataLoader(data.splits["val"], batch_size=512, shuffle=False, **loader_args) \
        if "val" in data.splits else None
    return sampler, loader_generator, train_loader, val_loader


def gather_rng() -> list[dict]:
    """Every rank's random-number state, in rank order (on rank 0; other ranks get their own only)."""
    state = rng_state()
    if get_world_size() == 1:
        return [state]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng(states: list[dict], run: Path) -> None:
    """Set this rank's random-number state from a checkpoint; a different process count continues the run, but
    not bit for bit (stated on stderr)."""
    rank, world = get_rank(), get_world_size()
    if len(states) != world:
        log(f"warning: {run} was trained with {len(states)} process(es) and resumes with {world}: it continues, but "
            "not identically to an uninterrupted run")
    if rank < len(states):
        set_rng_state(states[rank])


def keep_epochs(metrics: Path, epochs: int) -> None:
    """Drop the metrics lines of epochs after the checkpoint (a run killed between its log line and checkpoint)."""
    if not metrics.is_file():
        return
    def epoch_of(line: str) -> int:
        try:
            return int(json.loads(line).get("epoch", 0))
        except (ValueError, AttributeError):
            return epochs + 1  # a line cut short by the kill

    lines = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
    kept = [line for line in lines if epoch_of(line) <= epochs]
    if len(kept) != len(lines):
        atomic_write(metrics, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
