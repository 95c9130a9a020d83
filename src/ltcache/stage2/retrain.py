"""Methods trained on frozen features with class-balanced sampling: cRT and LWS (Sec. 4, Eq. 4)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ltcache.config import scaled_lr
from ltcache.data.samplers import class_probabilities, sample_weights
from ltcache.errors import LtcacheError
from ltcache.stage2.core import Fitted, LabData, LinearHead, register
from ltcache.train import cosine_schedule

BALANCED_DEFAULTS = {"batch_size": 512, "lr": None, "weight_decay": 5e-4, "momentum": 0.9, "min_steps": 500}


def train_class_balanced(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                         batch_size: int, lr: float | None, weight_decay: float, momentum: float, min_steps: int,
                         seed: int) -> dict:
    """Fit `module` (inputs -> logits) with CE, class-balanced sampling (Eq. 1, q = 0), SGD and cosine lr to 0.

    An epoch is len(inputs) draws, as in the paper. `min_steps` lengthens epochs on tiny datasets, where
    10 epochs of a few batches would not converge; at ImageNet-LT scale it is inactive.
    Returns the hyperparameters actually used.
    """
    if epochs < 1 or batch_size < 1:
        raise LtcacheError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    lr = scaled_lr(batch_size) if lr is None else lr
    steps_per_epoch = max(math.ceil(len(labels) / batch_size), math.ceil(min_steps / epochs))
    labels_np = labels.cpu().numpy()
    probs = class_probabilities(np.bincount(labels_np, minlength=int(labels_np.max()) + 1), 0.0)
    weights = torch.as_tensor(sample_weights(labels_np, probs))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch)
    criterion = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        draws = torch.multinomial(weights, steps_per_epoch * batch_size, replacement=True, generator=generator)
        for batch in draws.to(inputs.device).view(steps_per_epoch, batch_size):
            loss = criterion(module(inputs[batch]), labels[batch])
            if not torch.isfinite(loss):
                raise LtcacheError(f"stage-2 loss became {loss.item()} in epoch {epoch + 1}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "momentum": momentum, "steps": epochs * steps_per_epoch}


@register("crt", summary="re-initialized linear classifier re-trained on frozen features, class-balanced",
          epochs=10, **BALANCED_DEFAULTS)
def fit_crt(data: LabData, **hyperparameters) -> Fitted:
    torch.manual_seed(data.seed)
    features, labels = data.train.features, data.train.labels
    linear = nn.Linear(features.shape[1], data.num_classes).to(features.device)
    used = train_class_balanced(linear, features, labels, seed=data.seed, **hyperparameters)
    head = LinearHead(linear.weight.detach().clone(), linear.bias.detach().clone())
    return Fitted(head, used)


class ScaleLogits(nn.Module):
    """Eq. 4 on cached logits: (F @ W.T) * f = F @ (f * W).T, so no GEMM is needed per step.
    With the bias (as the official code does): (F @ W.T + b) * f."""

    def __init__(self, num_classes: int, device):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes, device=device))

    def forward(self, raw_logits: torch.Tensor) -> torch.Tensor:
        return raw_logits * self.scales


@register("lws", summary="learnable per-class scales f_j on the joint W (Eq. 4), class-balanced; with_bias scales "
          "b too, as the official code", epochs=5, with_bias=False, **BALANCED_DEFAULTS)
def fit_lws(data: LabData, *, with_bias: bool, **hyperparameters) -> Fitted:
    raw = data.raw_logits("train")
    bias = data.joint.bias if with_bias and data.joint.bias is not None else None
    scaling = ScaleLogits(data.num_classes, raw.device)
    inputs = raw + bias if bias is not None else raw
    used = train_class_balanced(scaling, inputs, data.train.labels, seed=data.seed, **hyperparameters)
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


@register("tau_learned", summary="tau learned with class-balanced sampling, W fixed (Appendix B.5)",
          epochs=5, **{**BALANCED_DEFAULTS, "weight_decay": 0.0})
def fit_tau_learned(data: LabData, **hyperparameters) -> Fitted:
    from ltcache.stage2.weight_norms import tau_normalize, weight_norms

    raw = data.raw_logits("train")
    module = LearnedTau(torch.log(weight_norms(data.joint.weight)).to(raw.device))
    used = train_class_balanced(module, raw, data.train.labels, seed=data.seed, **hyperparameters)
    tau = round(module.tau.item(), 4)
    return Fitted(LinearHead(tau_normalize(data.joint.weight, tau)), {"tau": tau, **used})
