"""Methods trained on frozen features: cRT and its variants, LWS (Sec. 4, Eq. 4), learned tau (App. B.5).

Their torch modules live in stage2/modules.py and the shared trainer in stage2/training.py; both are imported when a
fit runs, so registering these methods costs no torch import."""

from __future__ import annotations

import numpy as np

from ltcache.errors import LtcacheError
from ltcache.heads import LinearHead
from ltcache.params import GRID, Param
from ltcache.stage2.core import Fitted, LabData, with_defaults
from ltcache.stage2.methods.weight_norms import tau_normalize, weight_norms
from ltcache.stage2.training import TRAINING, fit_on_train, linear_head, retrain_linear, trained_method


@trained_method("crt", *TRAINING, Param("solver", str, "sgd", "sgd (the paper), or lbfgs: full batch, class "
                "weights 1/n_y.", choices=("sgd", "lbfgs")),
                Param("lbfgs_steps", int, 100, "L-BFGS iterations (solver=lbfgs).", low=1, high=100_000),
                summary="re-initialized linear classifier re-trained on frozen features, class-balanced; "
                "solver=lbfgs fits it full-batch", paper=3, weight_norms=True)
def fit_crt(data: LabData, *, solver: str, lbfgs_steps: int, **hyperparameters) -> Fitted:
    if solver == "lbfgs":
        return fit_crt_lbfgs(data, steps=lbfgs_steps, weight_decay=hyperparameters["weight_decay"])
    linear, used = retrain_linear(data, **hyperparameters)
    return Fitted(linear_head(linear), used)


def fit_crt_lbfgs(data: LabData, *, steps: int, weight_decay: float) -> Fitted:
    """cRT fitted full-batch by L-BFGS: class-balanced sampling becomes class weights 1/n_y (the same objective
    in expectation), weight decay the matching 0.5 * wd * ||W||^2 penalty."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(data.seed)
    from ltcache.logits import as_float32

    features, labels = as_float32(data.train.features), data.train.labels  # full-batch: float16 rows upcast once
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
    return Fitted(linear_head(linear), {"solver": "lbfgs", "lbfgs_steps": steps, "iterations": int(iterations),
                                        "weight_decay": weight_decay, "final_loss": round(final.item(), 6)})


@trained_method("crt_bsm", *TRAINING,
                summary="classifier re-trained with Balanced Softmax (Ren et al. 2020), instance sampling")
def fit_crt_balanced_softmax(data: LabData, **hyperparameters) -> Fitted:
    from ltcache.stage2.modules import BalancedSoftmax

    # The loss already corrects for the train prior, so batches follow the data (q = 1), not class-balanced.
    criterion = BalancedSoftmax(data.class_counts.tolist()).to(data.train.features.device)
    linear, used = retrain_linear(data, sampling_q=1.0, criterion=criterion, **hyperparameters)
    return Fitted(linear_head(linear), {**used, "sampling": "instance"})


def label_aware_smoothing(class_counts, head: float, tail: float):
    """Zhong et al. 2021 (MiSLAS), concave form:
    eps_y = tail + (head - tail) * sin(pi/2 * (n_y - n_min) / (n_max - n_min))."""
    import torch

    counts = np.asarray(class_counts, dtype=np.float64)
    span = max(counts.max() - counts.min(), 1.0)
    return torch.tensor(tail + (head - tail) * np.sin(0.5 * np.pi * (counts - counts.min()) / span),
                        dtype=torch.float32)


@trained_method("crt_las", *TRAINING,
                Param("smooth_head", float, 0.4, "Smoothing of the most frequent class.", low=0, below=1),
                Param("smooth_tail", float, 0.1, "Smoothing of the rarest class.", low=0, below=1),
                summary="classifier re-trained with label-aware smoothing (Zhong et al. 2021), class-balanced")
def fit_crt_label_aware_smoothing(data: LabData, *, smooth_head: float, smooth_tail: float, **hyperparameters):
    from ltcache.stage2.modules import SmoothedCrossEntropy

    epsilon = label_aware_smoothing(data.class_counts, smooth_head, smooth_tail).to(data.train.features.device)
    linear, used = retrain_linear(data, criterion=SmoothedCrossEntropy(epsilon), **hyperparameters)
    return Fitted(linear_head(linear), {**used, "smooth_head": smooth_head, "smooth_tail": smooth_tail})


@trained_method("crt_maxnorm", *with_defaults(TRAINING, weight_decay=5e-3),
                Param("max_norms", GRID, (0.5, 1.0, 2.0, 4.0, 8.0), "Norm caps to choose among, in multiples of "
                      "the joint head's median row norm.", above=0, max_points=100),
                summary="classifier re-trained with weight decay + MaxNorm (Alshammari et al. 2022); the norm cap "
                "chosen on the selection split")
def fit_crt_maxnorm(data: LabData, *, max_norms, **hyperparameters) -> Fitted:
    """max_norms are multiples of the joint classifier's median row norm; each is fitted, the best kept."""
    import torch

    scale = data.joint.weight.norm(dim=1).median().item()
    candidates = []
    for multiple in max_norms:
        cap = float(multiple) * scale

        def project(linear, cap=cap) -> None:  # PGD step: rows outside the ball go to its surface
            with torch.no_grad():
                norms = linear.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
                linear.weight.mul_((cap / norms).clamp(max=1.0))

        linear, used = retrain_linear(data, after_step=project, **hyperparameters)
        head = linear_head(linear)
        score = data.selection_score(head)
        candidates.append((score, -float(multiple), head, used, float(multiple)))
    score, _, head, used, multiple = max(candidates, key=lambda c: (c[0], c[1]))
    return Fitted(head, {**used, "max_norm": round(multiple * scale, 4), "max_norm_multiple": multiple,
                         "selected_on": data.select, "selection_mean_per_class": round(score, 4)},
                  [{"max_norm_multiple": c[4], "mean_per_class": c[0]} for c in candidates])


@trained_method("cos", *TRAINING, Param("scale", float, 16.0, "Initial scale s (learned).", above=0),
                summary="cosine classifier with a learned scale re-trained on frozen features (Table 12)")
def fit_cosine_classifier(data: LabData, *, scale: float, **hyperparameters) -> Fitted:
    import torch
    import torch.nn.functional as F

    from ltcache.stage2.modules import CosineClassifier

    torch.manual_seed(data.seed)
    features = data.train.features
    module = CosineClassifier(features.shape[1], data.num_classes, scale, features.device)
    used = fit_on_train(module, data, **hyperparameters)
    weight = (module.scale * F.normalize(module.weight, dim=1)).detach().clone()
    return Fitted(LinearHead(weight, None, normalize_input=True), {**used, "scale": round(module.scale.item(), 4)})


@trained_method("lws", *with_defaults(TRAINING, epochs=5),
                Param("with_bias", bool, False, "Scale the joint bias too (the official code)."),
                summary="learnable per-class scales f_j on the joint W (Eq. 4), class-balanced; with_bias scales b "
                "too, as the official code", paper=5, weight_norms=True)
def fit_lws(data: LabData, *, with_bias: bool, **hyperparameters) -> Fitted:
    from ltcache.stage2.modules import ScaleLogits

    bias = data.joint.bias if with_bias and data.joint.bias is not None else None
    raw = data.raw_logits(data.fitting, bias)  # whole when it fits the memory budget, else per batch
    scaling = ScaleLogits(data.num_classes, raw.device)
    used = fit_on_train(scaling, data, raw, **hyperparameters)
    scales = scaling.scales.detach().clone().to(data.joint.weight.device)
    head = LinearHead(data.joint.weight * scales[:, None], bias * scales if bias is not None else None)
    scale_range = {"scale_min": round(scales.min().item(), 4), "scale_max": round(scales.max().item(), 4)}
    return Fitted(head, {**used, "with_bias": with_bias, **scale_range})


@trained_method("tau_learned", *with_defaults(TRAINING, epochs=5, weight_decay=0.0),
                summary="tau learned with class-balanced sampling, W fixed (Appendix B.5)")
def fit_tau_learned(data: LabData, **hyperparameters) -> Fitted:
    import torch

    from ltcache.stage2.modules import LearnedTau

    raw = data.raw_logits(data.fitting)
    module = LearnedTau(torch.log(weight_norms(data.joint.weight)).to(raw.device))
    used = fit_on_train(module, data, raw, **hyperparameters)
    tau = round(module.tau.item(), 4)
    return Fitted(LinearHead(tau_normalize(data.joint.weight, tau)), {"tau": tau, **used})
