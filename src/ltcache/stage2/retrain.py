"""Methods trained on frozen features: cRT and its variants, LWS (Sec. 4, Eq. 4), learned tau (App. B.5)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltcache.config import scaled_lr
from ltcache.data.samplers import class_probabilities, sample_weights
from ltcache.errors import LtcacheError
from ltcache.heads import LinearHead
from ltcache.params import GRID, Param
from ltcache.stage2.core import Fitted, LabData, register, with_defaults
from ltcache.stage2.weight_norms import tau_normalize, weight_norms
from ltcache.train import cosine_schedule

# Every method here is fitted by SGD from a seed: compare --seeds N refits it N times.
register_trained = functools.partial(register, stochastic=True)
# cRT's schedule (Sec. 5.1), shared by every head trained on frozen features.
TRAINING = (
    Param("epochs", int, 10, "Epochs of len(train) draws.", low=1, high=100_000),
    Param("batch_size", int, 512, "Batch size.", low=1),
    Param("lr", float, None, "Peak lr, cosine to 0 (default 0.2 x batch / 512).", above=0, optional=True),
    Param("weight_decay", float, 5e-4, "SGD weight decay.", low=0),
    Param("momentum", float, 0.9, "SGD momentum.", low=0, below=1),
    Param("min_steps", int, 500, "Lengthen epochs on tiny data to reach this many steps in all.", low=0),
)
BALANCED_DEFAULTS = {param.name: param.default for param in TRAINING if param.name != "epochs"}


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
    batch_inputs = [t.new_empty((batch_size, *t.shape[1:])) for t in inputs]
    batch_labels = labels.new_empty(batch_size)
    for epoch in range(epochs):
        draws = torch.multinomial(weights, steps_per_epoch * batch_size, replacement=True, generator=generator)
        finite = torch.ones((), dtype=torch.bool, device=labels.device)
        for batch in draws.to(labels.device).view(steps_per_epoch, batch_size):
            for tensor, buffer in zip(inputs, batch_inputs, strict=True):
                torch.index_select(tensor, 0, batch, out=buffer)
            torch.index_select(labels, 0, batch, out=batch_labels)
            if own_loss:  # the module computes CE itself, faster than criterion(module(...)) (ScaledCrossEntropy)
                loss = module.loss(*batch_inputs, batch_labels)
            else:
                loss = criterion(module(*batch_inputs), batch_labels)
            finite &= torch.isfinite(loss.detach())  # checked once an epoch: no device sync per step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(module)
        if not finite.item():
            raise LtcacheError(f"the stage-2 loss stopped being finite in epoch {epoch + 1}; lower the lr")
        if on_epoch is not None:
            on_epoch(epoch + 1, module)
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "momentum": momentum, "steps": epochs * steps_per_epoch}


def _sgd(module: nn.Module, **options) -> torch.optim.SGD:
    """SGD with momentum; the fused kernel where this torch has it for the device (3x faster steps on CPU)."""
    try:
        return torch.optim.SGD(module.parameters(), fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(module.parameters(), **options)


def fit_on_train(module: nn.Module, data: LabData, inputs=None, **hyperparameters) -> dict:
    """train_on_features over the rows trained heads fit on (data.fitting): the train features, or their K
    augmented views when the cache has them (an epoch stays len(train) draws). `inputs` defaults to the
    features of those rows; pass row-aligned tensors (e.g. their cached logits) to train on something else."""
    split = data.split(data.fitting)
    used = train_on_features(module, split.features if inputs is None else inputs, split.labels, seed=data.seed,
                             epoch_rows=len(data.train), **hyperparameters)
    return {**used, "train_views": data.views} if data.fitting == "train_views" else used


def retrain_linear(data: LabData, **hyperparameters) -> tuple[nn.Linear, dict]:
    """A freshly initialized linear classifier trained on the frozen train features."""
    torch.manual_seed(data.seed)
    linear = nn.Linear(data.train.features.shape[1], data.num_classes).to(data.train.features.device)
    return linear, fit_on_train(linear, data, **hyperparameters)


def _linear_head(linear: nn.Linear) -> LinearHead:
    return LinearHead(linear.weight.detach().clone(), linear.bias.detach().clone())


@register_trained("crt", *TRAINING, Param("solver", str, "sgd", "sgd (the paper), or lbfgs: full batch, class "
                  "weights 1/n_y.", choices=("sgd", "lbfgs")),
                  Param("lbfgs_steps", int, 100, "L-BFGS iterations (solver=lbfgs).", low=1, high=100_000),
                  summary="re-initialized linear classifier re-trained on frozen features, class-balanced; "
                  "solver=lbfgs fits it full-batch")
def fit_crt(data: LabData, *, solver: str, lbfgs_steps: int, **hyperparameters) -> Fitted:
    if solver == "lbfgs":
        return fit_crt_lbfgs(data, steps=lbfgs_steps, weight_decay=hyperparameters["weight_decay"])
    linear, used = retrain_linear(data, **hyperparameters)
    return Fitted(_linear_head(linear), used)


def fit_crt_lbfgs(data: LabData, *, steps: int, weight_decay: float) -> Fitted:
    """cRT fitted full-batch by L-BFGS: class-balanced sampling becomes class weights 1/n_y (the same objective
    in expectation), weight decay the matching 0.5 * wd * ||W||^2 penalty."""
    torch.manual_seed(data.seed)
    features, labels = data.train.features, data.train.labels
    linear = nn.Linear(features.shape[1], data.num_classes).to(features.device)
    counts = torch.bincount(labels, minlength=data.num_classes).clamp_min(1).to(features.dtype)
    class_weight = (1.0 / counts) / (1.0 / counts).mean()
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(linear(features), labels, weight=class_weight)
        return loss + 0.5 * weight_decay * linear.weight.pow(2).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)  # returns the loss at the start, so the final objective is evaluated below
    with torch.no_grad():
        final = objective()
    if not torch.isfinite(final):
        raise LtcacheError("cRT with L-BFGS diverged; try crt.solver=sgd")
    iterations = optimizer.state[linear.weight].get("n_iter", steps)
    return Fitted(_linear_head(linear), {"solver": "lbfgs", "lbfgs_steps": steps, "iterations": int(iterations),
                                         "weight_decay": weight_decay, "final_loss": round(final.item(), 6)})


@register_trained("crt_bsm", *TRAINING,
                  summary="classifier re-trained with Balanced Softmax (Ren et al. 2020), instance sampling")
def fit_crt_balanced_softmax(data: LabData, **hyperparameters) -> Fitted:
    from ltcache.losses import build_loss

    # The loss already corrects for the train prior, so batches follow the data (q = 1), not class-balanced.
    criterion = build_loss("balanced_softmax", data.class_counts.tolist()).to(data.train.features.device)
    linear, used = retrain_linear(data, sampling_q=1.0, criterion=criterion, **hyperparameters)
    return Fitted(_linear_head(linear), {**used, "sampling": "instance"})


def label_aware_smoothing(class_counts, head: float, tail: float) -> torch.Tensor:
    """Zhong et al. 2021 (MiSLAS), concave form:
    eps_y = tail + (head - tail) * sin(pi/2 * (n_y - n_min) / (n_max - n_min))."""
    counts = np.asarray(class_counts, dtype=np.float64)
    span = max(counts.max() - counts.min(), 1.0)
    return torch.tensor(tail + (head - tail) * np.sin(0.5 * np.pi * (counts - counts.min()) / span),
                        dtype=torch.float32)


class SmoothedCrossEntropy(nn.Module):
    """(1 - eps_y) * CE + eps_y * mean_j(-log p_j): label smoothing with a per-class eps."""

    def __init__(self, epsilon: torch.Tensor):
        super().__init__()
        self.register_buffer("epsilon", epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1)
        eps = self.epsilon[targets]
        nll = -log_p.gather(1, targets[:, None]).squeeze(1)
        return ((1 - eps) * nll - eps * log_p.mean(1)).mean()


@register_trained("crt_las", *TRAINING,
                  Param("smooth_head", float, 0.4, "Smoothing of the most frequent class.", low=0, below=1),
                  Param("smooth_tail", float, 0.1, "Smoothing of the rarest class.", low=0, below=1),
                  summary="classifier re-trained with label-aware smoothing (Zhong et al. 2021), class-balanced")
def fit_crt_label_aware_smoothing(data: LabData, *, smooth_head: float, smooth_tail: float, **hyperparameters):
    epsilon = label_aware_smoothing(data.class_counts, smooth_head, smooth_tail).to(data.train.features.device)
    linear, used = retrain_linear(data, criterion=SmoothedCrossEntropy(epsilon), **hyperparameters)
    return Fitted(_linear_head(linear), {**used, "smooth_head": smooth_head, "smooth_tail": smooth_tail})


@register_trained("crt_maxnorm", *with_defaults(TRAINING, weight_decay=5e-3),
                  Param("max_norms", GRID, (0.5, 1.0, 2.0, 4.0, 8.0), "Norm caps to choose among, in multiples of "
                        "the joint head's median row norm.", above=0, max_points=100),
                  summary="classifier re-trained with weight decay + MaxNorm (Alshammari et al. 2022); the norm cap "
                  "chosen on the selection split")
def fit_crt_maxnorm(data: LabData, *, max_norms, **hyperparameters) -> Fitted:
    """max_norms are multiples of the joint classifier's median row norm; each is fitted, the best kept."""
    scale = data.joint.weight.norm(dim=1).median().item()
    candidates = []
    for multiple in max_norms:
        cap = float(multiple) * scale

        def project(linear: nn.Linear, cap=cap) -> None:  # PGD step: rows outside the ball go to its surface
            with torch.no_grad():
                norms = linear.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
                linear.weight.mul_((cap / norms).clamp(max=1.0))

        linear, used = retrain_linear(data, after_step=project, **hyperparameters)
        head = _linear_head(linear)
        score = data.score(head.predict(data.selection.features), data.select)["mean_per_class"]
        candidates.append((score, -float(multiple), head, used, float(multiple)))
    score, _, head, used, multiple = max(candidates, key=lambda c: (c[0], c[1]))
    return Fitted(head, {**used, "max_norm": round(multiple * scale, 4), "max_norm_multiple": multiple,
                         "selected_on": data.select, "selection_mean_per_class": round(score, 4)},
                  [{"max_norm_multiple": c[4], "mean_per_class": c[0]} for c in candidates])


class CosineClassifier(nn.Module):
    """s * cos(f, w_j) with a learned scale s (Gidaris & Komodakis 2018; paper Table 12)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float, device):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim, device=device) * 0.01)
        self.scale = nn.Parameter(torch.tensor(scale, device=device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


@register_trained("cos", *TRAINING, Param("scale", float, 16.0, "Initial scale s (learned).", above=0),
                  summary="cosine classifier with a learned scale re-trained on frozen features (Table 12)")
def fit_cosine_classifier(data: LabData, *, scale: float, **hyperparameters) -> Fitted:
    torch.manual_seed(data.seed)
    features = data.train.features
    module = CosineClassifier(features.shape[1], data.num_classes, scale, features.device)
    used = fit_on_train(module, data, **hyperparameters)
    weight = (module.scale * F.normalize(module.weight, dim=1)).detach().clone()
    return Fitted(LinearHead(weight, None, normalize_input=True), {**used, "scale": round(module.scale.item(), 4)})


class ScaledCrossEntropy(torch.autograd.Function):
    """CE(raw * scales, labels) with its gradient for `scales` only, written out: one exp pass gives both the loss
    (log-sum-exp, exact) and the softmax p; then d/ds_j = mean_i (p_ij - [y_i = j]) raw_ij. Autograd's generic
    path over the same ops took about 2.5x as long on a 512 x 1000 batch, and LWS and learned tau spend their
    whole fit here."""

    @staticmethod
    def forward(ctx, raw: torch.Tensor, scales: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = raw * scales
        peak = logits.amax(1, keepdim=True)
        p = logits.sub_(peak).exp_()  # exp(z - max), in place
        total = p.sum(1, keepdim=True)
        rows = torch.arange(len(labels), device=labels.device)
        # -log p_y = log sum_j exp(z_j - max) - (z_y - max), with z_y - max read back from the unexponentiated value
        target = (raw[rows, labels] * scales[labels] - peak[:, 0])
        loss = (total[:, 0].log() - target).mean()
        ctx.save_for_backward(raw, p.div_(total), labels)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        raw, p, labels = ctx.saved_tensors
        grad = p.clone()  # the saved p stays intact for a repeated backward
        grad[torch.arange(len(labels), device=labels.device), labels] -= 1
        return None, grad.mul_(raw).sum(0) * (grad_output / len(labels)), None


class ScaleLogits(nn.Module):
    """Eq. 4 on cached logits: (F @ W.T) * f = F @ (f * W).T, so no GEMM is needed per step.
    With the bias (as the official code does): (F @ W.T + b) * f."""

    def __init__(self, num_classes: int, device):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes, device=device))

    def forward(self, raw_logits: torch.Tensor) -> torch.Tensor:
        return raw_logits * self.scales

    def loss(self, raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ScaledCrossEntropy.apply(raw_logits, self.scales, labels)


@register_trained("lws", *with_defaults(TRAINING, epochs=5),
                  Param("with_bias", bool, False, "Scale the joint bias too (the official code)."),
                  summary="learnable per-class scales f_j on the joint W (Eq. 4), class-balanced; with_bias scales b "
                  "too, as the official code")
def fit_lws(data: LabData, *, with_bias: bool, **hyperparameters) -> Fitted:
    raw = data.raw_logits(data.fitting)
    bias = data.joint.bias if with_bias and data.joint.bias is not None else None
    scaling = ScaleLogits(data.num_classes, raw.device)
    used = fit_on_train(scaling, data, raw + bias if bias is not None else raw, **hyperparameters)
    scales = scaling.scales.detach().clone().to(data.joint.weight.device)
    head = LinearHead(data.joint.weight * scales[:, None], bias * scales if bias is not None else None)
    scale_range = {"scale_min": round(scales.min().item(), 4), "scale_max": round(scales.max().item(), 4)}
    return Fitted(head, {**used, "with_bias": with_bias, **scale_range})


class LearnedTau(nn.Module):
    """Appendix B.5: tau as the one parameter of the tau-normalized classifier, on cached raw logits."""

    def __init__(self, log_norms: torch.Tensor):
        super().__init__()
        self.log_norms = log_norms
        self.tau = nn.Parameter(torch.zeros((), device=log_norms.device))

    def forward(self, raw_logits: torch.Tensor) -> torch.Tensor:
        return raw_logits * torch.exp(-self.tau * self.log_norms)

    def loss(self, raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ScaledCrossEntropy.apply(raw_logits, torch.exp(-self.tau * self.log_norms), labels)


@register_trained("tau_learned", *with_defaults(TRAINING, epochs=5, weight_decay=0.0),
                  summary="tau learned with class-balanced sampling, W fixed (Appendix B.5)")
def fit_tau_learned(data: LabData, **hyperparameters) -> Fitted:
    raw = data.raw_logits(data.fitting)
    module = LearnedTau(torch.log(weight_norms(data.joint.weight)).to(raw.device))
    used = fit_on_train(module, data, raw, **hyperparameters)
    tau = round(module.tau.item(), 4)
    return Fitted(LinearHead(tau_normalize(data.joint.weight, tau)), {"tau": tau, **used})
