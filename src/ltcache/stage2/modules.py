"""The torch modules that stage-2 heads are trained as. Imported by the fit functions when they run, never at
registration, so listing methods needs no torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltcache.heads import adjust_disalign
from ltcache.logits import exp_shifted_


class BalancedSoftmax(nn.Module):
    """Balanced Softmax (Ren et al. 2020): CE(z + log pi), pi the train class prior; with `tau`, the logit-adjusted
    loss CE(z + tau log pi) of Menon et al. 2021 (tau = 1 is Balanced Softmax)."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        counts = torch.tensor(list(class_counts), dtype=torch.float32).clamp_min(1)
        self.register_buffer("adjustment", tau * torch.log(counts / counts.sum()))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, targets)


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


class CosineClassifier(nn.Module):
    """s * cos(f, w_j) with a learned scale s (Gidaris & Komodakis 2018; paper Table 12)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float, device, *, learn_scale: bool = True,
                 weight: torch.Tensor | None = None):
        super().__init__()
        initial = torch.randn(num_classes, feature_dim, device=device) * 0.01 if weight is None else weight.clone()
        self.weight = nn.Parameter(initial.to(device=device, dtype=torch.float32))
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(scale, device=device))
        else:  # a fixed scale, as LIFT's classifier
            self.register_buffer("scale", torch.tensor(scale, device=device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


class ScaledCrossEntropy(torch.autograd.Function):
    """CE(raw * scales, labels) with its gradient for `scales` only, written out: one exp pass gives both the loss
    (log-sum-exp, exact) and the softmax p; then d/ds_j = mean_i (p_ij - [y_i = j]) raw_ij. Autograd's generic
    path over the same ops took about 2.5x as long on a 512 x 1000 batch, and LWS and learned tau spend their
    whole fit here.

    Shapes broadcast over leading dimensions: raw [..., B, C], scales [..., C], labels [..., B] give one mean loss
    per leading index (a scalar for raw [B, C], scales [C]; [S, K] for K heads of S streams in one pass, raw
    [S, 1, B, C] and scales [S, K, C])."""

    @staticmethod
    def forward(ctx, raw: torch.Tensor, scales: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = raw * scales.unsqueeze(-2)
        lead, rows = logits.shape[:-2], logits.shape[-2]
        index = labels.expand(*lead, rows).unsqueeze(-1)
        peak = logits.amax(-1, keepdim=True)
        # -log p_y = log sum_j exp(z_j - max) - (z_y - max), with z_y read before the logits are exponentiated
        target = logits.gather(-1, index)[..., 0] - peak[..., 0]
        p = exp_shifted_(logits.sub_(peak))  # exp(z - max), in place, without subnormal floats (logits.py)
        total = p.sum(-1, keepdim=True)
        loss = (total[..., 0].log() - target).mean(-1)
        ctx.save_for_backward(raw, p.div_(total), index)
        ctx.scales_shape = scales.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        raw, p, index = ctx.saved_tensors
        grad = p.clone()  # the saved p stays intact for a repeated backward
        grad.scatter_add_(-1, index, torch.full_like(index, -1, dtype=grad.dtype))
        per_class = grad.mul_(raw).sum(-2) * (grad_output.unsqueeze(-1) / p.shape[-2])
        return None, per_class.sum_to_size(ctx.scales_shape), None


def scaled_cross_entropy(raw: torch.Tensor, scales: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean CE of raw * scales (ScaledCrossEntropy), differentiable in `scales`."""
    return ScaledCrossEntropy.apply(raw, scales, labels)


class ScaleLogits(nn.Module):
    """Eq. 4 on cached logits: (F @ W.T) * f = F @ (f * W).T, so no GEMM is needed per step.
    With the bias (as the official code does): (F @ W.T + b) * f."""

    def __init__(self, num_classes: int, device):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes, device=device))

    def forward(self, raw_logits: torch.Tensor) -> torch.Tensor:
        return raw_logits * self.scales

    def loss(self, raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return scaled_cross_entropy(raw_logits, self.scales, labels)

    @staticmethod
    def stacked_loss(state: dict, inputs: list, labels: torch.Tensor) -> torch.Tensor:
        """The loss of K stacked heads per stream (fitting.train_together): scales [S, K, C] on raw [S, B, C]."""
        return scaled_cross_entropy(inputs[0].unsqueeze(1), state["scales"], labels.unsqueeze(1))


class LearnedTau(nn.Module):
    """Appendix B.5: tau as the one parameter of the tau-normalized classifier, on cached raw logits."""

    def __init__(self, log_norms: torch.Tensor):
        super().__init__()
        self.register_buffer("log_norms", log_norms)
        self.tau = nn.Parameter(torch.zeros((), device=log_norms.device))

    def forward(self, raw_logits: torch.Tensor) -> torch.Tensor:
        return raw_logits * torch.exp(-self.tau * self.log_norms)

    def loss(self, raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return scaled_cross_entropy(raw_logits, torch.exp(-self.tau * self.log_norms), labels)

    @staticmethod
    def stacked_loss(state: dict, inputs: list, labels: torch.Tensor) -> torch.Tensor:
        """K stacked heads per stream: tau [S, K] and log_norms [S, K, C] on raw [S, B, C]."""
        scales = torch.exp(-state["tau"].unsqueeze(-1) * state["log_norms"])
        return scaled_cross_entropy(inputs[0].unsqueeze(1), scales, labels.unsqueeze(1))


class MaxNormLinear(nn.Linear):
    """A linear classifier whose rows are projected back into the ball ||w_j|| <= cap after every optimizer step
    (Alshammari et al. 2022's MaxNorm by projected gradient descent). Initialized as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features)
        self.register_buffer("cap", torch.tensor(float(cap)))

    @staticmethod
    def constrain_(state: dict) -> None:
        """The PGD step, in place: rows outside the ball go to its surface (weights with any leading dims)."""
        weight, cap = state["weight"], state["cap"]
        norms = weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        weight.mul_((cap[..., None, None] / norms).clamp(max=1.0))


class DisAlign(nn.Module):
    """Adaptive calibration of the frozen joint logits z: per-class magnitude alpha (init 1) and margin beta
    (init 0), mixed with z by a confidence gate sigma(f . v + c) computed from the feature f."""

    def __init__(self, feature_dim: int, num_classes: int, device):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_classes, device=device))
        self.beta = nn.Parameter(torch.zeros(num_classes, device=device))
        self.confidence = nn.Linear(feature_dim, 1).to(device)

    def forward(self, features: torch.Tensor, joint_logits: torch.Tensor) -> torch.Tensor:
        return adjust_disalign(joint_logits, features, self.alpha, self.beta, self.confidence.weight[0],
                               self.confidence.bias[0])


class MarginCalibration(nn.Module):
    """MARC (Wang et al. 2022): a_j z_j + b_j ||w_j|| on the frozen joint logits z, a starting at 1 and b at 0."""

    def __init__(self, norms: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(torch.ones_like(norms))
        self.margin = nn.Parameter(torch.zeros_like(norms))
        self.register_buffer("norms", norms)

    def forward(self, joint_logits: torch.Tensor) -> torch.Tensor:
        return self.scale * joint_logits + self.margin * self.norms


class MLP(nn.Sequential):
    def __init__(self, sizes: list[int], device):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        super().__init__(*layers)
        self.to(device)
