"""The SGD fitter both stages share: SGD with momentum, a cosine lr to 0, and batches drawn by Eq. 1
(class-balanced by default), over cached features or cached logits. Every stage-2 head that learns trains with it,
and stage 1 fits its linear probe (import-features, extract of a frozen model) with it. cRT's schedule (Sec. 5.1) is
declared once here (TRAINING), and methods re-declare only what differs (with_defaults).

torch is imported inside the functions, so the modules that import this one stay cheap to import.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from ltcache.core.console import duration, log
from ltcache.core.errors import LtcacheError
from ltcache.core.params import Param
from ltcache.core.runtime import cosine_factor, cosine_schedule, scaled_lr
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
                      epoch_rows: int | None = None, on_epoch=None, precision: str = "float32") -> dict:
    """Fit `module` (inputs -> logits) with SGD and a cosine lr to 0, drawing batches by Eq. 1.

    `inputs` is one tensor or a tuple of row-aligned tensors, passed to the module as separate arguments.
    sampling_q 0 (default) is class-balanced sampling, 1 instance-balanced. `criterion` defaults to CE;
    `after_step(module)` runs after every optimizer step (e.g. a norm projection), as does the module class's own
    `constrain_(state)` when it has one (see train_together). An epoch is `epoch_rows`
    draws (default len(labels)), as in the paper; `min_steps` lengthens epochs on tiny datasets, where 10 epochs
    of a few batches would not converge (at ImageNet-LT scale it is inactive). `on_epoch(epoch, module)` runs
    after every epoch (progress, learning curves). `precision` bf16 runs the products in bfloat16 (autocast; the
    weights, their gradients and the loss stay float32). Returns the hyperparameters used.
    """
    import torch
    from torch import nn

    from ltcache.core.distributed import get_world_size, local_rows

    if epochs < 1 or batch_size < 1:
        raise LtcacheError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    lr = scaled_lr(batch_size) if lr is None else lr
    steps_per_epoch = _steps_per_epoch(len(labels) if epoch_rows is None else epoch_rows, batch_size, epochs,
                                       min_steps)
    weights = _draw_weights(labels, sampling_q)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _sgd(module, lr=lr, momentum=momentum, weight_decay=weight_decay)
    constrain = getattr(type(module), "constrain_", None)
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
                with lower_precision(precision, labels.device):
                    if own_loss:  # the module computes CE itself, faster than criterion(module(...))
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
            if constrain is not None:
                with torch.no_grad():
                    constrain({**dict(module.named_parameters()), **dict(module.named_buffers())})
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
            "momentum": momentum, "steps": epochs * steps_per_epoch, **_precision_note(precision)}


def lower_precision(precision: str, device):
    """A context in which torch's matrix products run in bfloat16 (precision bf16: torch.autocast on the device's
    type, float32 master weights), or a no-op (float32)."""
    import torch

    from ltcache.core.options import PRECISIONS

    if precision not in PRECISIONS:
        raise LtcacheError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _precision_note(precision: str) -> dict:
    """What a fit records of its precision: nothing in float32 (the default), else the precision."""
    return {} if precision == "float32" else {"precision": precision}


def _steps_per_epoch(rows: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Steps of one epoch: `rows` draws in batches, lengthened so that all epochs make at least `min_steps`."""
    return max(math.ceil(rows / batch_size), math.ceil(min_steps / epochs))


def _draw_weights(labels: torch.Tensor, sampling_q: float) -> torch.Tensor:
    """Each row's probability of being drawn under Eq. 1 with exponent `sampling_q` (a CPU tensor)."""
    import torch

    labels_np = labels.cpu().numpy()
    probs = class_probabilities(np.bincount(labels_np, minlength=int(labels_np.max()) + 1), sampling_q)
    return torch.as_tensor(sample_weights(labels_np, probs))


def train_together(modules: list[nn.Module], inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor,
                   *, seeds: list[int], epochs: int, batch_size: int, lrs: list[float | None],
                   weight_decays: list[float], momentums: list[float], min_steps: int, sampling_q: float = 0.0,
                   criteria: list | None = None, epoch_rows: int | None = None,
                   losses: list[list[float]] | None = None, precision: str = "float32") -> list[dict]:
    """Train several heads of one structure in one pass, each exactly as train_on_features would train it alone
    (same seed: same draws and the same steps, to float rounding), and leave each module holding its result.

    The heads read the same batches: each distinct seed is a stream of draws (a grid shares one stream; compare
    --seeds N gives N), and per step there is one draw per stream, one gather of the batch rows, the heads' logits
    and losses (_stacked_step: a block of linear heads from one product, other modules mapped with torch.func.vmap),
    and a vectorized SGD update in which every head keeps its own lr, weight decay and momentum (_StackedSgd:
    tensors over the heads, not a Python loop over them). The modules must share their class and the
    names and shapes of their parameters and buffers; what differs between heads (a smoothing, a norm cap, a loss
    prior) lives in their buffers or their criterion's. A module class may supply `stacked_loss(state, inputs,
    labels) -> [S, K]` (a hand-written batched loss) and `constrain_(state)` (an in-place projection after every
    step, on parameters with any leading dimensions). `losses`, when given, receives each head's mean loss per
    epoch; `precision` is train_on_features's. Returns the hyperparameters each head used, as train_on_features
    does.
    """
    import torch
    from torch.func import stack_module_state

    count = len(modules)
    if not (len(seeds) == len(lrs) == len(weight_decays) == len(momentums) == count) or count == 0:
        raise LtcacheError("train_together needs one seed, lr, weight decay and momentum per module")
    if epochs < 1 or batch_size < 1:
        raise LtcacheError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    streams = list(dict.fromkeys(seeds))
    per_stream = [[i for i in range(count) if seeds[i] == seed] for seed in streams]
    if len({len(members) for members in per_stream}) > 1:  # not a rectangle of streams x heads: one pass per stream
        used: list[dict] = [{}] * count
        for members in per_stream:
            def pick(values, members=members):
                return [values[i] for i in members]

            part_losses = [[] for _ in members] if losses is not None else None
            for i, result in zip(members, train_together(
                    pick(modules), inputs, labels, seeds=pick(seeds), epochs=epochs, batch_size=batch_size,
                    lrs=pick(lrs), weight_decays=pick(weight_decays), momentums=pick(momentums), min_steps=min_steps,
                    sampling_q=sampling_q, criteria=pick(criteria) if criteria is not None else None,
                    epoch_rows=epoch_rows, losses=part_losses, precision=precision), strict=True):
                used[i] = result
            if losses is not None:
                for i, part in zip(members, part_losses, strict=True):
                    losses[i].extend(part)
        return used
    order = [i for members in per_stream for i in members]  # stream-major: row s * K + k of the stacked state
    n_streams, per = len(streams), len(per_stream[0])
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    device = labels.device
    peaks = [scaled_lr(batch_size) if lr is None else lr for lr in lrs]
    steps_per_epoch = _steps_per_epoch(len(labels) if epoch_rows is None else epoch_rows, batch_size, epochs,
                                       min_steps)
    total_steps = epochs * steps_per_epoch

    objectives = [_objective(modules[i], criteria[i] if criteria is not None else None) for i in order]
    signatures = {_signature(objective) for objective in objectives}
    if len(signatures) > 1:
        raise LtcacheError("train_together needs modules of one class with the same parameter and buffer shapes")
    params, buffers = stack_module_state(objectives)
    params = {key: value.detach().view(n_streams, per, *value.shape[1:]).requires_grad_() for key, value in
              params.items()}
    buffers = {key: value.view(n_streams, per, *value.shape[1:]) for key, value in buffers.items()}
    module_class = type(objectives[0].module)
    constrain = getattr(module_class, "constrain_", None)

    def column(values):  # one value per head, as [S, K] on the device
        return torch.tensor([values[i] for i in order], dtype=torch.float32, device=device).view(n_streams, per)

    sgd = _StackedSgd(params, column(peaks), column(weight_decays), column(momentums))
    step_of = _stacked_step(objectives[0], len(inputs), params, precision)

    weights = _draw_weights(labels, sampling_q)
    generators = [torch.Generator().manual_seed(seed) for seed in streams]
    rows_per_step = n_streams * batch_size
    gathers = [_gatherer(t, rows_per_step) for t in inputs]
    label_buffer = labels.new_empty(rows_per_step)
    reporter = EpochProgress(epochs)
    step = 0
    for epoch in range(epochs):
        draws = torch.stack([torch.multinomial(weights, steps_per_epoch * batch_size, replacement=True,
                                               generator=generator) for generator in generators])
        draws = draws.to(device).view(n_streams, steps_per_epoch, batch_size).transpose(0, 1)
        finite = torch.ones((), dtype=torch.bool, device=device)
        summed = torch.zeros((n_streams, per), dtype=torch.float64, device=device) if losses is not None else None
        for batch in draws:
            flat = batch.reshape(-1)
            batch_inputs = [gather(flat).view(n_streams, batch_size, *source.shape[1:])
                            for gather, source in zip(gathers, inputs, strict=True)]
            batch_labels = torch.index_select(labels, 0, flat, out=label_buffer).view(n_streams, batch_size)
            sgd.factor = cosine_factor(step, total_steps)  # the lr cosine_schedule gives a fit alone
            loss = step_of(params, buffers, batch_inputs, batch_labels, sgd)  # computes and takes every head's step
            finite &= torch.isfinite(loss).all()  # checked once an epoch: no device sync per step
            if summed is not None:
                summed += loss
            if constrain is not None:
                with torch.no_grad():
                    constrain({key.removeprefix("module."): value for key, value in {**params, **buffers}.items()})
            step += 1
        if not finite.item():
            raise LtcacheError(f"the stage-2 loss stopped being finite in epoch {epoch + 1}; lower the lr")
        if summed is not None:
            means = (summed / steps_per_epoch).reshape(-1).tolist()
            for position, i in enumerate(order):
                losses[i].append(means[position])
        reporter.epoch_done(epoch + 1)
    with torch.no_grad():  # every module holds its trained values, as after train_on_features
        for position, objective in enumerate(objectives):
            s, k = divmod(position, per)
            for key, value in objective.named_parameters():
                value.copy_(params[key][s, k])
    return [{"epochs": epochs, "batch_size": batch_size, "lr": peaks[i], "weight_decay": weight_decays[i],
             "momentum": momentums[i], "steps": total_steps, **_precision_note(precision)} for i in range(count)]


class _StackedSgd:
    """SGD with momentum and weight decay as torch.optim.SGD defines it (velocity = momentum * velocity + gradient +
    decay * weight; weight -= lr * velocity), for stacked heads [S, K, ...], each head with its own lr (the peak times
    the schedule's `factor` of the step), weight decay and momentum: [S, K] tensors, in place, one pass of a few
    element-wise operations per parameter tensor (or per block of heads: `update`'s `heads`), no loop over heads."""

    def __init__(self, params: dict, peak, decay, momentum):
        import torch

        self.peak, self.decay, self.momentum = peak, decay, momentum
        self.decays = bool((decay != 0).any())
        self.velocity = {key: torch.zeros_like(value) for key, value in params.items()}
        self.factor = 1.0

    def update(self, key: str, value, gradient, heads: tuple = (slice(None), slice(None))) -> None:
        """One step of parameter `key` (value [S, K, ...] or the block `heads` of it) from its `gradient`."""
        import torch

        with torch.no_grad():
            velocity = self.velocity[key][heads]
            shape = velocity.shape[:2] + (1,) * (velocity.dim() - 2)
            velocity.mul_(self.momentum[heads].view(shape)).add_(gradient)
            if self.decays:
                velocity.addcmul_(value, self.decay[heads].view(shape))
            value.addcmul_(velocity, (self.peak[heads] * self.factor).view(shape), value=-1)

    def update_all(self, params: dict) -> None:
        for key, value in params.items():
            self.update(key, value.detach(), value.grad)


def _stacked_step(objective, arguments: int, params: dict, precision: str = "float32"):
    """`step(params, buffers, inputs, labels, sgd) -> [S, K]`: the mean loss of every stacked head of `objective`'s
    structure (parameters and buffers stacked [S, K, ...], inputs [S, B, ...] and labels [S, B] per stream), each
    head's gradient computed and its SGD step taken (sgd: _StackedSgd).

    - A plain linear classifier (nn.Linear's own forward: cRT and its variants) takes its step a block of heads at a
      time (_linear_step): the block's logits from one product, its gradients from one more into buffers allocated
      once (a fresh K x C x d gradient every step cost more in page faults than its product); autograd runs at most
      the loss over the logits.
    - A module class with `stacked_loss` (LWS, learned tau) computes its loss by hand.
    - Any other module is mapped over the heads and the streams (torch.func.vmap of functional_call).
    The loss is cross-entropy over every head's logits at once, or the criterion mapped over the heads with its own
    stacked buffers (a smoothing, a prior, class weights). `precision` bf16 runs the products in bfloat16 (the
    linear step casts its operands; the others run under autocast).
    """
    import copy

    from torch import nn
    from torch.func import functional_call, vmap

    module, criterion = objective.module, objective.criterion

    def backward_of(loss_of):
        def step(params, buffers, inputs, labels, sgd):
            for value in params.values():
                value.grad = None
            with lower_precision(precision, labels.device):
                loss = loss_of(params, buffers, inputs, labels).float()
            loss.sum().backward()  # the heads are independent: each gets the gradient of its own loss
            sgd.update_all(params)
            return loss.detach()

        return step

    stacked_loss = getattr(type(module), "stacked_loss", None)
    if stacked_loss is not None and criterion is None:
        return backward_of(lambda params, buffers, inputs, labels: stacked_loss(
            _part({**params, **buffers}, "module."), inputs, labels))
    if criterion is None and hasattr(module, "loss"):  # a module's own loss without a batched form: map it whole
        base = copy.deepcopy(objective).to("meta")

        def whole(params, buffers, *batch):
            return functional_call(base, (params, buffers), batch, tie_weights=False)  # no head ties weights

        mapped = vmap(vmap(whole, in_dims=(0, 0) + (None,) * (arguments + 1)), in_dims=(0, 0) + (0,) * (arguments + 1))
        return backward_of(lambda params, buffers, inputs, labels: mapped(params, buffers, *inputs, labels))
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _linear_step(None if criterion is None else _criterion_loss(criterion, head_dim=2), params,
                            precision)

    base_module = copy.deepcopy(module).to("meta")

    def forward(state, *batch):
        return functional_call(base_module, state, batch, tie_weights=False)

    mapped_forward = vmap(vmap(forward, in_dims=(0,) + (None,) * arguments), in_dims=(0,) + (0,) * arguments)
    loss_over = _criterion_loss(criterion, head_dim=1)  # the mapped logits are [S, K, B, C]
    return backward_of(lambda params, buffers, inputs, labels: loss_over(
        {**params, **buffers}, mapped_forward(_part({**params, **buffers}, "module."), *inputs), labels))


def _part(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _criterion_loss(criterion, head_dim: int):
    """`loss(state, logits, labels) -> [S, K]` over the logits of every head (the heads on dimension `head_dim` of
    [S, ..., C]): cross-entropy of all rows at once, or `criterion` mapped over the heads with its stacked buffers
    (state's criterion.* entries)."""
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, vmap

    if criterion is None:
        def cross_entropy(state, logits, labels):
            targets = labels.unsqueeze(head_dim).expand(logits.shape[:-1])
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            per_head = losses.view(logits.shape[:-1]).mean(3 - head_dim)  # the mean over the rows of each head
            return per_head.view(logits.shape[0], logits.shape[head_dim])

        return cross_entropy
    base = copy.deepcopy(criterion).to("meta")

    def one(state, logits, labels):
        return functional_call(base, state, (logits, labels), tie_weights=False)

    mapped = vmap(vmap(one, in_dims=(0, head_dim - 1, None)), in_dims=(0, 0, 0))
    return lambda state, logits, labels: mapped(_part(state, "criterion."), logits, labels)


CACHE_BYTES = 32 << 20  # on a CPU, the heads of a linear block keep weight, gradient and velocity within this


def _linear_step(loss_over, params: dict, precision: str = "float32"):
    """The step of stacked linear classifiers (see _stacked_step), a block of heads at a time: their logits
    x W^T + b from one product [B, d] x [d, h*C], the loss's gradient G over them (cross-entropy written out when
    `loss_over` is None, else by autograd), dW = G^T x and db = sum G into buffers allocated once, and the block's
    SGD step. On a GPU a block is every head of a stream (one product fills it); on a CPU it is as many heads as keep
    their weights, gradients and velocities within CACHE_BYTES, so that the step's passes over them stay in the
    cache (K = 8 ImageNet-LT heads as one block streamed 190 MB from memory per step and ran 10% slower than the
    eight fits alone). In bf16 both products take bfloat16 operands (as autocast would), the logits and gradients
    land in float32."""
    import torch

    weight, bias = params["module.weight"], params.get("module.bias")
    streams, heads, classes, dim = weight.shape
    if weight.device.type == "cpu":
        block = max(1, min(heads, CACHE_BYTES // (3 * classes * (dim + 1) * weight.element_size())))
    else:
        block = heads
    blocks = [(s, k, min(k + block, heads)) for s in range(streams) for k in range(0, heads, block)]
    grad_weight = torch.empty((block * classes, dim), dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty(block * classes, dtype=weight.dtype, device=weight.device)
    low = torch.bfloat16 if precision == "bf16" else None
    logits_buffer: list = []

    def logits_of(features, w, b, rows):  # [B, h*C] float32
        if low is not None:  # a fresh float32 result: bf16 products cannot write into one
            features, w = features.to(low), w.to(low)
            out = torch.mm(features, w.T) if b is None else torch.addmm(b.to(low), features, w.T)
            return out.float()
        if not logits_buffer or logits_buffer[0].shape[0] != rows:
            logits_buffer[:] = [features.new_empty((rows, block * classes))]
        out = logits_buffer[0][:, : w.shape[0]]
        return torch.mm(features, w.T, out=out) if b is None else torch.addmm(b, features, w.T, out=out)

    def step(params, buffers, inputs, labels, sgd):
        features = inputs[0]
        rows = features.shape[1]
        state = {**params, **buffers}
        losses = []
        for s, first, last in blocks:
            count = last - first
            w = weight.detach()[s, first:last].reshape(count * classes, dim)
            b = None if bias is None else bias.detach()[s, first:last].reshape(count * classes)
            with torch.no_grad():
                flat = logits_of(features[s], w, b, rows)
            if loss_over is None:
                loss, gradient = _cross_entropy_and_gradient(flat.view(1, rows, count, classes), labels[s : s + 1])
            else:
                logits = flat.view(1, rows, count, classes).requires_grad_()
                part = {key: value[s : s + 1, first:last] for key, value in state.items()}
                loss = loss_over(part, logits, labels[s : s + 1])
                gradient = torch.autograd.grad(loss.sum(), logits)[0]
            gradient = gradient.reshape(rows, count * classes)
            with torch.no_grad():
                gw = grad_weight[: count * classes]
                if low is not None:
                    gw.copy_(torch.mm(gradient.T.to(low), features[s].to(low)))
                else:
                    torch.mm(gradient.T, features[s], out=gw)
                heads_of = (slice(s, s + 1), slice(first, last))
                sgd.update("module.weight", weight.detach()[heads_of], gw.view(1, count, classes, dim), heads_of)
                if bias is not None:
                    gb = torch.sum(gradient, dim=0, out=grad_bias[: count * classes])
                    sgd.update("module.bias", bias.detach()[heads_of], gb.view(1, count, classes), heads_of)
            losses.append((s, first, last, loss.detach()))
        out = weight.new_empty((streams, heads))
        for s, first, last, loss in losses:
            out[s, first:last] = loss[0]
        return out

    return step


def _cross_entropy_and_gradient(logits, labels):
    """The mean cross-entropy of each head, logits [S, B, K, C] and labels [S, B]: losses [S, K] and their gradient
    over the logits, (softmax - onehot) / B, written out in one exp pass. The logits are overwritten. The exp avoids
    subnormal floats (logits.exp_shifted_): F.cross_entropy's log-softmax took 20x longer on the logits of a head
    trained at a high lr, whose far-off classes underflow."""
    from ltcache.logits import exp_shifted_

    rows = logits.shape[1]
    index = labels[:, :, None, None].expand(*logits.shape[:-1], 1)
    peak = logits.amax(-1, keepdim=True)
    target = logits.gather(-1, index) - peak
    probabilities = exp_shifted_(logits.sub_(peak))
    total = probabilities.sum(-1, keepdim=True)
    losses = (total.log() - target)[..., 0].mean(1)
    gradient = probabilities.div_(total.mul_(rows))
    gradient.scatter_add_(-1, index, gradient.new_full(index.shape, -1.0 / rows))
    return losses, gradient


def _objective(module, criterion):
    """A head and its criterion as one module whose forward is the loss (what train_together stacks and maps):
    criterion(module(*inputs), labels), the module's own `loss` where it has one and no criterion is given, CE
    otherwise."""
    return _objective_class()(module, criterion)


@functools.cache
def _objective_class():
    """The nn.Module class behind _objective, defined on first use so that importing this file needs no torch."""
    from torch import nn

    class Objective(nn.Module):
        def __init__(self, module, criterion):
            super().__init__()
            self.module = module
            self.criterion = criterion
            self._own_loss = criterion is None and hasattr(module, "loss")
            self._default = nn.CrossEntropyLoss() if criterion is None else None

        def forward(self, *batch):
            *features, labels = batch
            if self._own_loss:
                return self.module.loss(*features, labels)
            return (self.criterion or self._default)(self.module(*features), labels)

    return Objective


def stack_signature(module, criterion=None) -> tuple:
    """What must agree for heads to be trained together (train_together): the classes of the module and of its
    criterion, and every parameter's and buffer's name, shape and dtype."""
    return _signature(_objective(module, criterion))


def _signature(objective) -> tuple:
    return (type(objective.module), type(objective.criterion),
            tuple((key, tuple(value.shape), value.dtype) for key, value in objective.named_parameters()),
            tuple((key, tuple(value.shape), value.dtype) for key, value in objective.named_buffers()))


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
