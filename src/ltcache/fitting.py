"""The SGD fitter both stages share: SGD with momentum, a cosine lr to 0, and batches drawn by Eq. 1
(class-balanced by default), over cached features or cached logits. Every stage-2 head that learns trains with it,
and stage 1 fits its linear probe (import-features, extract of a frozen model) with it. cRT's schedule (Sec. 5.1) is
declared once here (TRAINING), and methods re-declare only what differs (with_defaults).

torch is imported inside the functions, so the modules that import this one stay cheap to import.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from ltcache.core.console import duration, log
from ltcache.core.errors import LtcacheError
from ltcache.core.params import Param
from ltcache.core.runtime import cosine_schedule, scaled_lr
from ltcache.core.sampling import class_probabilities, sample_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ltcache.heads import LinearHead

TRAINING = (
    Param("epochs", int, 10, "Epochs of len(train) draws.", low=1, high=100_000),
    Param("batch_size", int, 512, "Batch size.", low=1, high=2**24),
    Param("lr", float, None, "Peak lr, cosine to 0 (default 0.2 x batch / 512).", above=0, optional=True,
          default_text="0.2 x batch_size / 512"),
    Param("weight_decay", float, 5e-4, "SGD weight decay.", low=0),
    Param("momentum", float, 0.9, "SGD momentum.", low=0, below=1),
    Param("min_steps", int, 500, "Lengthen epochs on tiny data to reach this many steps in all.", low=0,
          high=10**8),
)
BALANCED_DEFAULTS = {param.name: param.default for param in TRAINING if param.name != "epochs"}
PROGRESS_AFTER_SECONDS = 5.0  # an epoch loop that takes longer than this shows a progress line per epoch


def train_on_features(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, *,
                      epochs: int, batch_size: int, lr: float | None, weight_decay: float, momentum: float,
                      min_steps: int, seed: int, sampling_q: float = 0.0, criterion=None, after_step=None,
                      epoch_rows: int | None = None, on_epoch=None) -> dict:
    """Fit `module` (inputs -> logits) with SGD and a cosine lr to 0, drawing batches by Eq. 1.

    `inputs` is one tensor or a tuple of row-aligned tensors, passed to the module as separate arguments.
    sampling_q 0 (default) is class-balanced sampling, 1 instance-balanced. `criterion` defaults to CE;
    `after_step(module)` runs after every optimizer step (e.g. a norm projection). An epoch is `epoch_rows`
    draws (default len(labels)), as in the paper; `min_steps` lengthens epochs on tiny datasets, where 10 epochs
    of a few batches would not converge (at ImageNet-LT scale it is inactive). `on_epoch(epoch, module)` runs
    after every epoch (progress, learning curves). Returns the hyperparameters used.
    """
    import torch
    from torch import nn

    from ltcache.core.distributed import get_world_size, local_rows

    if epochs < 1 or batch_size < 1:
        raise LtcacheError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    lr = scaled_lr(batch_size) if lr is None else lr
    rows = len(labels) if epoch_rows is None else epoch_rows
    steps_per_epoch = max(math.ceil(rows / batch_size), math.ceil(min_steps / epochs))
    labels_np = labels.cpu().numpy()
    probs = class_probabilities(np.bincount(labels_np, minlength=int(labels_np.max()) + 1), sampling_q)
    weights = torch.as_tensor(sample_weights(labels_np, probs))
    generator = torch.Generator().manual_seed(seed)
    optimizer = _sgd(module, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch)
    own_loss = criterion is None and hasattr(module, "loss")
    criterion = criterion or nn.CrossEntropyLoss()
    # Batches are gathered into buffers allocated once: a fresh [batch, d] tensor per step costs page faults
    # that, at ImageNet-LT shape on a CPU, took longer than the gather itself.
    gathers = [_gatherer(t, batch_size) for t in inputs]
    label_buffer = labels.new_empty(batch_size)
    # Under torchrun every rank draws the same global batches (same generator) and computes the rows of its own
    # contiguous share of the data; its loss is rescaled from its own rows' normalizer to the whole batch's (see
    # batch_normalizer) and the gradients summed over ranks, so each step is the single-process step, whatever the
    # number of processes.
    share = local_rows(len(labels)) if get_world_size() > 1 else None
    parameters = [p for p in module.parameters() if p.requires_grad]
    reporter = EpochProgress(epochs)
    losses = _LOSSES.get()
    for epoch in range(epochs):
        draws = torch.multinomial(weights, steps_per_epoch * batch_size, replacement=True, generator=generator)
        finite = torch.ones((), dtype=torch.bool, device=labels.device)
        summed = torch.zeros((), dtype=torch.float64, device=labels.device) if losses is not None else None
        for batch in draws.to(labels.device).view(steps_per_epoch, batch_size):
            if share is not None:
                whole_batch = batch_normalizer(criterion, labels[batch])
                batch = batch[(batch >= share.start) & (batch < share.stop)]
            optimizer.zero_grad(set_to_none=True)
            if len(batch):
                batch_inputs = [gather(batch) for gather in gathers]
                batch_labels = torch.index_select(labels, 0, batch, out=label_buffer[: len(batch)])
                if own_loss:  # the module computes CE itself, faster than criterion(module(...)) (ScaledCrossEntropy)
                    loss = module.loss(*batch_inputs, batch_labels)
                else:
                    loss = criterion(module(*batch_inputs), batch_labels)
                finite &= torch.isfinite(loss.detach())  # checked once an epoch: no device sync per step
                if summed is not None:
                    summed += loss.detach()
                if share is not None:  # this rank's sum of the batch's loss terms over the whole batch's normalizer
                    loss = loss * (batch_normalizer(criterion, batch_labels) / whole_batch)
                loss.backward()
            if share is not None:
                sum_gradients(parameters)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(module)
        if not finite.item():
            raise LtcacheError(f"the stage-2 loss stopped being finite in epoch {epoch + 1}; lower the lr")
        if summed is not None:
            losses.append(summed.item() / steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1, module)
        reporter.epoch_done(epoch + 1)
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "momentum": momentum, "steps": epochs * steps_per_epoch}


def batch_normalizer(criterion, labels: torch.Tensor):
    """What `criterion` divides its summed loss terms by over a batch with `labels`: the sum of the class weights of
    a weighted cross-entropy (nn.CrossEntropyLoss(weight=w) is sum_i w_yi l_i / sum_i w_yi, DisAlign's loss), else
    the number of rows. Under torchrun a rank multiplies its mean by its own normalizer and divides by the whole
    batch's, so the ranks' losses add up to the single-process loss."""
    weight = getattr(criterion, "weight", None)
    return weight[labels].sum() if weight is not None else float(len(labels))


def _gatherer(source, batch_size: int):
    """`gather(index)`: the rows `index` (at most batch_size) of `source` in float32, written into a buffer
    allocated once. `source` is a tensor (float16 rows are upcast) or a BlockLogits (logits beyond the memory
    budget, computed per batch from the features)."""
    import torch

    from ltcache.logits import BlockLogits

    if isinstance(source, BlockLogits):
        features = source.features
        feature_buffer = torch.empty((batch_size, features.shape[1]), dtype=torch.float32, device=features.device)
        buffer = torch.empty((batch_size, source.shape[1]), dtype=torch.float32, device=features.device)

        def gather_logits(index):
            out = buffer[: len(index)]
            source.gather(index, out, feature_buffer[: len(index)])
            return out

        return gather_logits
    if source.is_floating_point() and source.dtype != torch.float32:
        buffer = source.new_empty((batch_size, *source.shape[1:]), dtype=torch.float32)
        staging = source.new_empty((batch_size, *source.shape[1:]))
        return lambda index: buffer[: len(index)].copy_(torch.index_select(source, 0, index,
                                                                            out=staging[: len(index)]))
    buffer = source.new_empty((batch_size, *source.shape[1:]))
    return lambda index: torch.index_select(source, 0, index, out=buffer[: len(index)])


def sum_gradients(parameters: list) -> None:
    """Sum every parameter's gradient over the torchrun ranks (a rank whose share of the batch was empty adds
    zeros), in one all-reduce of one flat buffer."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    offset = 0
    for p in parameters:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def _sgd(module: nn.Module, **options) -> torch.optim.SGD:
    """SGD with momentum; the fused kernel where this torch has it for the device (3x faster steps on CPU)."""
    import torch

    try:
        return torch.optim.SGD(module.parameters(), fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(module.parameters(), **options)


def linear_head(linear: nn.Linear) -> LinearHead:
    """A trained nn.Linear as a LinearHead (detached copies)."""
    from ltcache.heads import LinearHead

    return LinearHead(linear.weight.detach().clone(), linear.bias.detach().clone())


class EpochProgress:
    """One line per epoch on stderr once an epoch loop has run longer than PROGRESS_AFTER_SECONDS, so a long fit
    (cRT at ImageNet-LT scale on a CPU) is never silent; a short one prints nothing."""

    def __init__(self, epochs: int):
        self.epochs, self.start, self.shown = epochs, time.perf_counter(), False

    def epoch_done(self, epoch: int) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed < PROGRESS_AFTER_SECONDS and not self.shown:
            return
        self.shown = True
        left = elapsed / epoch * (self.epochs - epoch)
        log(f"  epoch {epoch}/{self.epochs}  {duration(elapsed)}, {duration(left)} left")


_LOSSES: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("ltcache_losses", default=None)


@contextlib.contextmanager
def recording_losses():
    """Within it, every train_on_features call appends each epoch's mean training loss to the list it yields (the
    loss curve compare --tensorboard writes); outside, no loss is read back from the device."""
    losses: list[float] = []
    token = _LOSSES.set(losses)
    try:
        yield losses
    finally:
        _LOSSES.reset(token)
