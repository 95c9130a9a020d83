"""Heads from the recent long-tail work on frozen (foundation-model) features.

Without a text tower:
- `gda`: Gaussian discriminant analysis, a training-free baseline that is hard to beat on frozen features (Wang et
  al., ICLR 2024, "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation");
- `cos_la`: a cosine classifier trained with the logit-adjusted loss, LIFT's classifier (Shi et al., ICML 2024,
  "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts"), here on cached features.

With CLIP's zero-shot text head (extract --zero-shot; LabData.text, logits = W_text @ normalize(f)):
- `zero_shot`: the text head as it is (Radford et al., ICML 2021);
- `zs_ensemble`: (1 - a) joint + a zero-shot logits, a chosen on the selection split (output-space ensembling, the
  "naive ensemble" that GLA improves on);
- `gla`: generalized logit adjustment (Zhu et al., NeurIPS 2023, "Generalized Logit Adjustment: Calibrating
  Fine-tuned Models by Removing Label Bias in Foundation Models"): the zero-shot head's own label bias log pi_p is
  estimated on the labelled train split and removed, the train prior is removed from the joint head, and the two
  are summed with equal weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.errors import LtcacheError
from ltcache.heads import LOGIT_CHUNK_ROWS, LinearCosineHead, LinearHead
from ltcache.params import GRID, Param
from ltcache.stage2.core import Fitted, LabData, method, with_defaults
from ltcache.stage2.training import TRAINING, fit_on_train, trained_method

if TYPE_CHECKING:
    import torch

SHRINKAGES = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4, 0.7)
SINGULAR = 1e-10  # smallest / largest eigenvalue of the shrunk covariance below which it counts as singular


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """(class means [C, d], pooled within-class covariance [d, d]) in float64, a chunk of rows at a time:
    S = (sum_i f_i f_i^T - sum_k n_k mu_k mu_k^T) / N, the covariance of each row about its class mean."""
    import torch

    dim = features.shape[1]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=features.device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=features.device)
    for chunk, chunk_labels in zip(features.split(LOGIT_CHUNK_ROWS), labels.split(LOGIT_CHUNK_ROWS), strict=True):
        chunk = chunk.double()
        sums.index_add_(0, chunk_labels, chunk)
        gram.addmm_(chunk.T, chunk)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    means = sums / counts.clamp_min(1)[:, None]
    covariance = (gram - (means * counts[:, None]).T @ means) / max(1, len(labels))
    return means, covariance


def gda_head(means: torch.Tensor, covariance: torch.Tensor, shrinkage: float, eigen=None) -> LinearHead | None:
    """The LDA head for a uniform class prior: Sigma = (1 - a) S + a tr(S)/d I, w_k = Sigma^-1 mu_k,
    b_k = -mu_k^T Sigma^-1 mu_k / 2 (argmax_k of the Gaussian log-likelihood with one shared covariance).

    Sigma^-1 comes from one eigendecomposition of S (pass `eigen` = torch.linalg.eigh(S) to reuse it across a
    grid), so a singular or nearly singular Sigma is seen (None) instead of solved into huge weights."""
    import torch

    values, vectors = eigen if eigen is not None else torch.linalg.eigh(covariance)
    dim = covariance.shape[0]
    shrunk = (1 - shrinkage) * values.clamp_min(0) + shrinkage * covariance.trace() / dim
    if shrunk.min() <= SINGULAR * shrunk.max():
        return None
    projected = means @ vectors  # [C, d] in the eigenbasis
    weight = (projected / shrunk) @ vectors.T
    bias = -0.5 * (weight * means).sum(1)
    return LinearHead(weight.float(), bias.float())


@method("gda", Param("shrinkages", GRID, SHRINKAGES, "Shrinkage of the shared covariance toward tr(S)/d I, chosen on "
                     "the selection split.", low=0, high=1, max_points=100),
        summary="Gaussian discriminant analysis (Wang et al. ICLR 2024): class means and one shared covariance, "
        "uniform prior, training-free; the covariance shrinkage chosen on the selection split")
def fit_gda(data: LabData, *, shrinkages) -> Fitted:
    """Class means and the pooled within-class covariance of the train features, then for every shrinkage the LDA
    head, the best on the selection split kept (ties: the first in the grid)."""
    import torch

    split = data.split(data.fitting)
    means, covariance = class_statistics(split.features, split.labels, data.num_classes)
    eigen = torch.linalg.eigh(covariance)
    curve, best = [], None
    for shrinkage in shrinkages:
        head = gda_head(means, covariance, float(shrinkage), eigen)
        if head is None:  # singular (e.g. shrinkage 0 with fewer train rows than dimensions)
            curve.append({"shrinkage": float(shrinkage), "mean_per_class": float("nan")})
            continue
        score = data.selection_score(head)
        curve.append({"shrinkage": float(shrinkage), "mean_per_class": score})
        if best is None or score > best[0]:
            best = (score, float(shrinkage), head)
    if best is None:
        raise LtcacheError("gda: the covariance is singular at every shrinkage; add a shrinkage above 0, e.g. "
                           "--set gda.shrinkages=0.1,0.5")
    score, shrinkage, head = best
    return Fitted(head, {"shrinkage": shrinkage, "selected_on": data.select,
                         "selection_mean_per_class": round(score, 4)}, curve)


@trained_method("cos_la", *with_defaults(TRAINING),
                Param("scale", float, 25.0, "Fixed scale s of the cosine logits (LIFT's authors sweep 15 to 30).",
                      above=0, high=1000),
                Param("tau", float, 1.0, "Logit adjustment of the loss: CE(s cos + tau log prior).", low=0, high=10),
                Param("init", str, "means", "Initial class weights: the train class means, CLIP's zero-shot text "
                      "head (a cache extracted with --zero-shot), or random.", choices=("means", "text", "random")),
                summary="cosine classifier with a fixed scale trained by the logit-adjusted loss on instance-sampled "
                "batches, LIFT's classifier (Shi et al. ICML 2024); class-mean initialized")
def fit_cos_la(data: LabData, *, scale: float, tau: float, init: str, **hyperparameters) -> Fitted:
    """The loss adds tau log(prior) to the logits during training only, so the trained cosine logits aim at a
    balanced test set as they are (no post-hoc shift)."""
    import torch
    import torch.nn.functional as F

    from ltcache.stage2.methods.ncm import class_means
    from ltcache.stage2.modules import BalancedSoftmax, CosineClassifier

    torch.manual_seed(data.seed)
    split = data.split(data.fitting)
    device = split.features.device
    initial = None
    if init == "text":
        if data.text is None:
            raise LtcacheError("cos_la.init=text needs CLIP's zero-shot text head; extract with --backbone "
                               "open_clip:ARCH/TAG --zero-shot, or use init=means")
        initial = F.normalize(data.text.weight.to(device), dim=1)
    elif init == "means":
        initial = F.normalize(class_means(split.features, split.labels, data.num_classes,
                                          lambda chunk: F.normalize(chunk, dim=1)), dim=1)
    module = CosineClassifier(split.features.shape[1], data.num_classes, scale, device, learn_scale=False,
                              weight=initial)
    criterion = BalancedSoftmax(data.class_counts.tolist(), tau).to(device)
    used = fit_on_train(module, data, sampling_q=1.0, criterion=criterion, **hyperparameters)
    weight = (scale * F.normalize(module.weight, dim=1)).detach().clone()
    return Fitted(LinearHead(weight, None, normalize_input=True),
                  {**used, "scale": scale, "tau": tau, "init": init, "sampling": "instance"})

# ------------------------------------------------------------------------------ with CLIP's zero-shot text head


@method("zero_shot", summary="CLIP's zero-shot text head as extracted (Radford et al. ICML 2021): class-name "
        "prompts, no training", text=True)
def fit_zero_shot(data: LabData) -> Fitted:
    return Fitted(data.text, {})


ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))


@method("zs_ensemble", Param("alphas", GRID, ALPHAS, "Weight a of the zero-shot logits: (1 - a) joint + a "
                             "zero-shot, chosen on the selection split.", low=0, high=1, max_points=100),
        Param("la_tau", float, 0.0, "Logit adjustment of the joint part first: joint - la_tau log(train prior) "
              "(0: the joint head as it is).", low=0, high=10),
        summary="output-space ensemble of the joint head and CLIP's zero-shot text head, the weight chosen on the "
        "selection split (the naive ensemble of Zhu et al. NeurIPS 2023)", text=True)
def fit_zs_ensemble(data: LabData, *, alphas, la_tau: float) -> Fitted:
    import torch

    from ltcache.stage2.methods.weight_norms import log_prior

    weight = data.joint.weight
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros(data.num_classes, device=weight.device)
    bias = bias - la_tau * log_prior(data, weight.device)
    text = data.text.weight.to(weight.device)
    curve, best = [], None
    for alpha in alphas:
        alpha = float(alpha)
        head = LinearCosineHead((1 - alpha) * weight, alpha * text, (1 - alpha) * bias)
        score = data.selection_score(head)
        curve.append({"alpha": alpha, "mean_per_class": score})
        if best is None or score > best[0]:
            best = (score, alpha, head)
    score, alpha, head = best
    return Fitted(head, {"alpha": alpha, "la_tau": la_tau, "selected_on": data.select,
                         "selection_mean_per_class": round(score, 4)}, curve)


def estimate_label_bias(logits, labels, class_counts, *, max_iter: int = 200) -> tuple:
    """GLA's bias estimate (Zhu et al. 2023): the log prior b that the zero-shot logits z carry, found on labelled
    data whose own prior pi_s is known as argmin_b CE(z - b + log pi_s, y), a convex problem solved by L-BFGS over
    row blocks of `logits` (a tensor or a BlockLogits). Returns (b normalized to a log-distribution, L-BFGS steps,
    final loss). At the optimum the mean softmax over the rows equals pi_s in every class."""
    import torch
    import torch.nn.functional as F

    from ltcache.logits import chunk_rows, row_blocks

    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=labels.device).clamp_min(1)
    log_train = torch.log(counts / counts.sum())
    bias = torch.zeros_like(log_train, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    rows, evaluations = len(labels), [0]

    def closure():
        optimizer.zero_grad()
        total, start = 0.0, 0
        for block in row_blocks(logits, chunk_rows(len(log_train))):
            block_labels = labels[start : start + len(block)]
            start += len(block)
            loss = F.cross_entropy(block.float() - bias + log_train, block_labels, reduction="sum") / rows
            loss.backward()
            total += loss.item()
        evaluations[0] += 1
        return torch.tensor(total)

    loss = optimizer.step(closure)
    estimate = torch.log_softmax(bias.detach(), 0)
    return estimate, evaluations[0], float(loss)


@method("gla", summary="generalized logit adjustment (Zhu et al. NeurIPS 2023): CLIP's zero-shot label bias "
        "estimated on train and removed, the train prior removed from the joint head, the two summed", text=True)
def fit_gla(data: LabData) -> Fitted:
    """z = (joint - log pi_s) + (zero-shot - log pi_p), with log pi_p from estimate_label_bias on the train split
    (its labels and class counts): GLA's equal-weight ensemble, Bayes-optimal for a balanced test set when both
    heads are calibrated to their priors."""
    import torch

    from ltcache.stage2.methods.weight_norms import log_prior

    split = data.train
    weight = data.joint.weight
    text = data.text.to(weight.device)
    log_pretrain, evaluations, loss = estimate_label_bias(data.logits(text, split.features), split.labels,
                                                          data.class_counts)
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros(data.num_classes, device=weight.device)
    head = LinearCosineHead(weight, text.weight, bias - log_prior(data, weight.device) - log_pretrain.to(weight.device))
    spread = log_pretrain.max().item() - log_pretrain.min().item()
    return Fitted(head, {"estimated_on": "train", "bias_spread": round(spread, 4), "lbfgs_evaluations": evaluations,
                         "bias_loss": round(loss, 6)})
