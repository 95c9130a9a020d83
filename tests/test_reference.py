"""Every built-in stage-2 method against an independent computation of the published method on a small input.

The trained heads are checked against one hand-written trainer: Eq. 1 draws, SGD with momentum and weight decay as
torch.optim.SGD defines them, the cosine lr of every step, and each method's loss written out from its paper, so a
change to a method's loss, sampling, initialization or projection shows here. Each method's card
(stage2/cards.py) names its test in this file or beside the method's other tests; the last test checks that every
named test exists.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import lab_data
from ltcache.cache import Split
from ltcache.stage2 import METHODS, fit_method

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [40, 15, 6, 3]
DIM = 6


def toy_data(seed: int = 0, text: bool = False):
    """4 overlapping Gaussian classes in 6 dimensions, long-tailed train, balanced val; a joint head biased to the
    head class; with `text`, a zero-shot text head on the normalized features."""
    generator = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(len(COUNTS), DIM, generator=generator)

    def draw(counts):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return centers[labels] + torch.randn(len(labels), DIM, generator=generator), labels

    features, labels = draw(COUNTS)
    val = Split(*draw([12] * len(COUNTS)))
    weight = centers * torch.tensor([1.5, 1.0, 0.6, 0.4])[:, None]
    data = lab_data(weight, torch.tensor([0.5, 0.0, -0.2, -0.4]), features, labels, COUNTS, val=val, seed=seed)
    if text:
        from ltcache.heads import LinearHead

        data.text = LinearHead(8 * F.normalize(centers + 0.5 * torch.randn(centers.shape, generator=generator), dim=1),
                               None, normalize_input=True)
    return data


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.mean([(predictions[labels == c] == c).float().mean().item() for c in labels.unique()]))


# ------------------------------------------------------------------------------ methods that choose on a grid


def test_joint_is_the_stage_one_classifier():
    data = toy_data()
    head = fit_method("joint", data).head
    features = data.val.features
    assert torch.allclose(head.logits(features), features @ data.joint.weight.T + data.joint.bias, atol=1e-6)


def official_knn_logits(train, labels, test, feat_type: str, dist_type: str) -> torch.Tensor:
    """classifier-balancing's run_networks.get_knncentroids and KNNClassifier.forward, written again in numpy."""
    feats, test = train.numpy().astype(np.float64), test.numpy().astype(np.float64)
    mean = feats.mean(0)
    if feat_type == "cl2n":
        feats = feats - mean
    if feat_type in ("l2n", "cl2n"):
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    centroids = np.stack([feats[labels.numpy() == c].mean(0) for c in np.unique(labels.numpy())])
    if feat_type == "cl2n":
        test = test - mean
    if feat_type in ("l2n", "cl2n"):
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    if dist_type == "l2":
        return torch.from_numpy(-((test**2).sum(1)[:, None] + (centroids**2).sum(1)[None] - 2 * test @ centroids.T))
    # ltcache's cosine: both sides normalized (the official 'cos' leaves the centroids as they are; see the card)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return torch.from_numpy((test / np.linalg.norm(test, axis=1, keepdims=True)) @ centroids.T)


@pytest.mark.parametrize("features", ["un", "l2n", "cl2n"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ncm_equals_the_official_knn_classifier(features, metric):
    data = toy_data(seed=1)
    head = fit_method("ncm", data, {"features": features, "metric": metric}).head
    reference = official_knn_logits(data.train.features, data.train.labels, data.val.features, features,
                                    "l2" if metric == "euclidean" else "cos")
    ours = head.logits(data.val.features).double()
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    # the logits themselves, up to the row constant ||x||^2 that the linear form leaves out
    shift = (reference - ours).mean(1, keepdim=True)
    assert torch.allclose(ours + shift, reference, atol=1e-4)
    if (features, metric) == ("cl2n", "euclidean"):
        assert fit_method("ncm", data).chosen == {"metric": "euclidean", "features": "cl2n"}  # the official default


def brute_force(data, candidates: dict, logits_of) -> tuple:
    """The candidate with the best mean per-class accuracy on val, ties to the first (the least change)."""
    scores = {key: per_class_accuracy(logits_of(value).argmax(1), data.val.labels) for key, value in candidates.items()}
    best = max(scores.values())
    return next(key for key, score in scores.items() if score == best), scores


def test_tau_norm_equals_the_official_pnorm_sweep_chosen_on_val():
    data = toy_data(seed=2)
    weight = data.joint.weight
    norms = weight.norm(dim=1)
    pnorm = {float(p): weight / norms[:, None] ** float(p) for p in np.round(np.linspace(0, 2, 21), 1)}  # tau_norm.py
    tau, _ = brute_force(data, pnorm, lambda w: data.val.features @ w.T)
    fitted = fit_method("tau_norm", data)
    assert fitted.chosen["tau"] == pytest.approx(tau)
    assert torch.allclose(fitted.head.logits(data.val.features), data.val.features @ pnorm[tau].T, atol=1e-5)
    assert fitted.head.bias is None  # Eq. 3 drops the bias


def test_logit_adjustment_equals_a_brute_force_search():
    data = toy_data(seed=3)
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))
    joint = data.val.features @ data.joint.weight.T + data.joint.bias
    taus = {round(0.1 * k, 1): round(0.1 * k, 1) for k in range(21)}
    tau, _ = brute_force(data, taus, lambda t: joint - t * log_prior)
    fitted = fit_method("logit_adj", data)
    assert fitted.chosen["la_tau"] == pytest.approx(tau)
    assert torch.allclose(fitted.head.logits(data.val.features), joint - tau * log_prior, atol=1e-5)


def test_tau_norm_la_equals_a_brute_force_search():
    data = toy_data(seed=4)
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))
    weight, norms = data.joint.weight, data.joint.weight.norm(dim=1)
    grid = {(round(0.1 * t, 1), 0.25 * a): (round(0.1 * t, 1), 0.25 * a) for t in range(21) for a in range(9)}

    def logits(point):
        tau, la_tau = point
        return data.val.features @ (weight / norms[:, None] ** tau).T - la_tau * log_prior

    best, _ = brute_force(data, grid, logits)
    fitted = fit_method("tau_norm_la", data)
    assert (fitted.chosen["tau"], fitted.chosen["la_tau"]) == pytest.approx(best)
    assert torch.allclose(fitted.head.logits(data.val.features), logits(best), atol=1e-5)


# ------------------------------------------------------------------------------ trained heads, by hand


def hand_sgd(params: list[torch.Tensor], loss_of, labels: torch.Tensor, *, q: float, epochs: int, batch_size: int,
             lr: float, weight_decay: float, momentum: float, min_steps: int, seed: int, after_step=None) -> None:
    """Eq. 1 draws (p_j = n_j^q / sum_i n_i^q, each sample p_y / n_y), torch.optim.SGD's update (d = g + wd w;
    buf = momentum buf + d, the first buf = d; w -= lr_t buf) and lr_t = lr (1 + cos(pi t / T)) / 2 at step t."""
    counts = np.bincount(labels.numpy(), minlength=len(COUNTS)).astype(np.float64)
    probabilities = counts**q / (counts**q).sum()
    weights = torch.as_tensor((probabilities / counts)[labels.numpy()])
    generator = torch.Generator().manual_seed(seed)
    steps = max(math.ceil(len(labels) / batch_size), math.ceil(min_steps / epochs))
    total, step, buffers = epochs * steps, 0, [None] * len(params)
    for _ in range(epochs):
        draws = torch.multinomial(weights, steps * batch_size, replacement=True, generator=generator)
        for batch in draws.view(steps, batch_size):
            rate = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            grads = torch.autograd.grad(loss_of(batch), params)
            with torch.no_grad():
                for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
                    direction = grad + weight_decay * param
                    buffers[i] = direction.clone() if buffers[i] is None else buffers[i] * momentum + direction
                    param -= rate * buffers[i]
                if after_step is not None:
                    after_step()
            step += 1


SCHEDULE = {"epochs": 2, "batch_size": 16, "min_steps": 20, "momentum": 0.9}


def linear_init(seed: int, *shapes) -> list[torch.Tensor]:
    """nn.Linear's default initialization, seeded as the methods seed it (torch.manual_seed(data.seed) first)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, n_out) for n_in, n_out in shapes]
    return [t.detach().clone().requires_grad_() for layer in layers for t in (layer.weight, layer.bias)]


def reference_crt(data, *, lr, weight_decay, loss="ce", q=0.0, after_step=None, params=None):
    features, labels = data.train.features, data.train.labels
    weight, bias = params or linear_init(data.seed, (DIM, len(COUNTS)))
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))
    head_eps, tail_eps = 0.4, 0.1
    counts = np.asarray(COUNTS, dtype=np.float64)
    epsilon = torch.tensor(tail_eps + (head_eps - tail_eps) * np.sin(np.pi / 2 * (counts - counts.min())
                                                                     / (counts.max() - counts.min())),
                           dtype=torch.float32)

    def loss_of(batch):
        logits = features[batch] @ weight.T + bias
        y = labels[batch]
        if loss == "balanced_softmax":  # Ren et al. 2020: CE(z + log n_y / N)
            return F.cross_entropy(logits + log_prior, y)
        if loss == "label_aware_smoothing":  # Zhong et al. 2021, Eq. 2 with the concave eps
            log_p = torch.log_softmax(logits, 1)
            eps = epsilon[y]
            return ((1 - eps) * -log_p[torch.arange(len(y)), y] - eps * log_p.mean(1)).mean()
        return F.cross_entropy(logits, y)

    hand_sgd([weight, bias], loss_of, labels, q=q, lr=lr, weight_decay=weight_decay, seed=data.seed,
             after_step=(lambda: after_step(weight)) if after_step else None, **SCHEDULE)
    return lambda x: x @ weight.detach().T + bias.detach()


def reference_cos(data, *, lr, weight_decay):
    torch.manual_seed(data.seed)
    weight = (torch.randn(len(COUNTS), DIM) * 0.01).requires_grad_()
    scale = torch.tensor(16.0, requires_grad=True)
    features, labels = data.train.features, data.train.labels

    def loss_of(batch):
        return F.cross_entropy(scale * F.normalize(features[batch], dim=1) @ F.normalize(weight, dim=1).T,
                               labels[batch])

    hand_sgd([weight, scale], loss_of, labels, q=0.0, lr=lr, weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: scale.detach() * F.normalize(x, dim=1) @ F.normalize(weight.detach(), dim=1).T


def reference_cos_la(data, *, lr, weight_decay):
    """LIFT's classifier: a cosine head of fixed scale 25 trained by CE(25 cos + log prior) on instance batches,
    started from the text features when there are some (else the normalized class means)."""
    features, labels = data.train.features, data.train.labels
    if data.text is not None:
        start = F.normalize(data.text.weight, dim=1)
    else:
        normalized = F.normalize(features, dim=1)
        start = F.normalize(torch.stack([normalized[labels == c].mean(0) for c in range(len(COUNTS))]), dim=1)
    weight = start.clone().requires_grad_()
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))

    def loss_of(batch):
        cosine = F.normalize(features[batch], dim=1) @ F.normalize(weight, dim=1).T
        return F.cross_entropy(25 * cosine + log_prior, labels[batch])

    hand_sgd([weight], loss_of, labels, q=1.0, lr=lr, weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: 25 * F.normalize(x, dim=1) @ F.normalize(weight.detach(), dim=1).T


def reference_lws(data, *, lr, weight_decay, with_bias=False):
    scales = torch.ones(len(COUNTS), requires_grad=True)
    features, labels, weight, bias = data.train.features, data.train.labels, data.joint.weight, data.joint.bias

    def loss_of(batch):  # Eq. 4: f_j w_j; the official code scales the bias too
        logits = features[batch] @ (scales[:, None] * weight).T + (scales * bias if with_bias else 0)
        return F.cross_entropy(logits, labels[batch])

    hand_sgd([scales], loss_of, labels, q=0.0, lr=lr, weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: x @ (scales.detach()[:, None] * weight).T + (scales.detach() * bias if with_bias else 0)


def reference_tau_learned(data, *, lr, weight_decay):
    tau = torch.zeros((), requires_grad=True)
    features, labels, weight = data.train.features, data.train.labels, data.joint.weight
    norms = weight.norm(dim=1)

    def loss_of(batch):  # Appendix B.5: the tau-normalized classifier (no bias) with tau learned
        return F.cross_entropy(features[batch] @ (weight / norms[:, None] ** tau).T, labels[batch])

    hand_sgd([tau], loss_of, labels, q=0.0, lr=lr, weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: x @ (weight / norms[:, None] ** tau.detach()).T


def reference_disalign(data, *, lr, weight_decay, rho=1.2):
    """Zhang et al. 2021: z' = sigma(x) (alpha * z + beta) + (1 - sigma(x)) z, trained with the generalized
    re-weighting loss sum_i w_yi l_i / sum_i w_yi, w_c = (n_c / N)^-rho, on instance batches."""
    alpha = torch.ones(len(COUNTS), requires_grad=True)
    beta = torch.zeros(len(COUNTS), requires_grad=True)
    torch.manual_seed(data.seed)
    gate = nn.Linear(DIM, 1)
    v, c = gate.weight.detach().clone().requires_grad_(), gate.bias.detach().clone().requires_grad_()
    features, labels = data.train.features, data.train.labels
    class_weight = (torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)) ** -rho

    def logits_of(x):
        z = x @ data.joint.weight.T + data.joint.bias
        sigma = torch.sigmoid(x @ v.T + c)
        return sigma * (alpha * z + beta) + (1 - sigma) * z

    def loss_of(batch):
        y = labels[batch]
        w = class_weight[y].float()
        return (w * F.cross_entropy(logits_of(features[batch]), y, reduction="none")).sum() / w.sum()

    hand_sgd([alpha, beta, v, c], loss_of, labels, q=1.0, lr=lr, weight_decay=weight_decay, seed=data.seed,
             **SCHEDULE)
    return lambda x: logits_of(x).detach()


def reference_mlp(data, *, layers, lr, weight_decay):
    shapes = [(DIM, DIM)] * (layers - 1) + [(DIM, len(COUNTS))]
    params = linear_init(data.seed, *shapes)
    features, labels = data.train.features, data.train.labels

    def forward(x):
        for i in range(0, len(params) - 2, 2):
            x = torch.relu(x @ params[i].T + params[i + 1])
        return x @ params[-2].T + params[-1]

    hand_sgd(params, lambda batch: F.cross_entropy(forward(features[batch]), labels[batch]), labels, q=0.0, lr=lr,
             weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: forward(x).detach()


def maxnorm_case(data, *, lr, weight_decay):
    cap = 2.0 * data.joint.weight.norm(dim=1).median().item()

    def project(weight):  # after every step: rows outside the ball go to its surface
        weight *= (cap / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)

    return reference_crt(data, lr=lr, weight_decay=weight_decay, after_step=project)


def reference_marc(data, *, lr, weight_decay, rho=1.2):
    """Imbalance-VLM's MARC_Net: a * z + b * ||w||, z = W x + b_joint frozen, trained with grw_loss (class weights
    (1 / n_c)^rho, mean 1: F.cross_entropy's weighted mean) on instance batches."""
    scale = torch.ones(len(COUNTS), requires_grad=True)
    margin = torch.zeros(len(COUNTS), requires_grad=True)
    norms = data.joint.weight.norm(dim=1)
    features, labels = data.train.features, data.train.labels
    weights = 1 / torch.tensor(COUNTS, dtype=torch.float64) ** rho
    weights = (weights / weights.sum() * len(COUNTS)).float()

    def logits_of(x):
        return scale * (x @ data.joint.weight.T + data.joint.bias) + margin * norms

    hand_sgd([scale, margin], lambda batch: F.cross_entropy(logits_of(features[batch]), labels[batch], weight=weights),
             labels, q=1.0, lr=lr, weight_decay=weight_decay, seed=data.seed, **SCHEDULE)
    return lambda x: logits_of(x).detach()


TRAINED = {  # method: (its overrides, the hand-written reference)
    "crt": ({"lr": 0.3}, lambda d: reference_crt(d, lr=0.3, weight_decay=5e-4)),
    "crt_bsm": ({"lr": 0.3}, lambda d: reference_crt(d, lr=0.3, weight_decay=5e-4, loss="balanced_softmax", q=1.0)),
    "crt_las": ({"lr": 0.3}, lambda d: reference_crt(d, lr=0.3, weight_decay=5e-4, loss="label_aware_smoothing")),
    "crt_maxnorm": ({"lr": 0.3, "max_norms": [2.0]}, lambda d: maxnorm_case(d, lr=0.3, weight_decay=5e-3)),
    "cos": ({"lr": 0.3}, lambda d: reference_cos(d, lr=0.3, weight_decay=5e-4)),
    "cos_la": ({}, lambda d: reference_cos_la(d, lr=0.01 * 16 / 128, weight_decay=5e-4)),  # LIFT's lr for batch 16
    "lws": ({"lr": 0.3}, lambda d: reference_lws(d, lr=0.3, weight_decay=5e-4)),
    "tau_learned": ({"lr": 0.3}, lambda d: reference_tau_learned(d, lr=0.3, weight_decay=0.0)),
    "disalign": ({}, lambda d: reference_disalign(d, lr=0.02, weight_decay=0.0)),
    "marc": ({}, lambda d: reference_marc(d, lr=0.03, weight_decay=5e-4)),
    "mlp2": ({"lr": 0.1}, lambda d: reference_mlp(d, layers=2, lr=0.1, weight_decay=5e-4)),
    "mlp3": ({"lr": 0.1}, lambda d: reference_mlp(d, layers=3, lr=0.1, weight_decay=5e-4)),
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_head_equals_hand_written_sgd(name):
    overrides, reference = TRAINED[name]
    data = toy_data(seed=5)
    fitted = fit_method(name, data, {**SCHEDULE, **overrides})
    assert fitted.chosen.get("steps") == SCHEDULE["epochs"] * 10  # max(ceil(64 / 16), 20 / 2) steps an epoch
    expected = reference(data)(data.val.features)
    ours = fitted.head.logits(data.val.features)
    assert torch.allclose(ours, expected, atol=2e-4, rtol=1e-4), (name, (ours - expected).abs().max().item())
    assert (ours - data.joint.logits(data.val.features)).abs().max() > 1e-2  # it trained: not the joint head


def test_maxnorm_projects_after_every_step_not_every_epoch():
    """A cap the free rows exceed within an epoch: projecting once per epoch (the released trainval.py) ends
    elsewhere than projecting every step (the paper, and ltcache)."""
    data = toy_data(seed=5)
    cap = 2.0 * data.joint.weight.norm(dim=1).median().item()
    fitted = fit_method("crt_maxnorm", data, {**SCHEDULE, "lr": 0.3, "max_norms": [2.0]})
    assert fitted.head.weight.norm(dim=1).max() <= cap * (1 + 1e-5)
    steps = []

    def once_per_epoch(weight):  # the released code's placement: after the last step of each epoch only
        steps.append(1)
        if len(steps) % 10 == 0:
            weight *= (cap / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)

    per_epoch = reference_crt(data, lr=0.3, weight_decay=5e-3, after_step=once_per_epoch)(data.val.features)
    per_step = maxnorm_case(data, lr=0.3, weight_decay=5e-3)(data.val.features)
    ours = fitted.head.logits(data.val.features)
    assert torch.allclose(ours, per_step, atol=2e-4, rtol=1e-4)
    assert (ours - per_epoch).abs().max() > 0.1  # the two placements end apart (0.73 when written)


def test_cos_la_starts_from_the_text_head_when_the_cache_has_one():
    data = toy_data(seed=6, text=True)
    fitted = fit_method("cos_la", data, SCHEDULE)
    assert fitted.chosen["init"] == "text" and fitted.chosen["lr"] == pytest.approx(0.01 * 16 / 128)
    expected = reference_cos_la(data, lr=0.01 * 16 / 128, weight_decay=5e-4)(data.val.features)
    assert torch.allclose(fitted.head.logits(data.val.features), expected, atol=2e-4)
    assert fit_method("cos_la", toy_data(seed=6), SCHEDULE).chosen["init"] == "means"


# ------------------------------------------------------------------------------ every card names a real test


def test_every_built_in_method_has_a_card_whose_reference_test_exists():
    defined: dict[str, set[str]] = {}
    for name in sorted(METHODS):
        card = METHODS[name].card
        assert card is not None, name
        assert card.paper and card.reference_test, name
        assert card.code is None or ":" in card.code, (name, card.code)  # "owner/repository: file, ..."
        for deviation in card.deviations:
            assert deviation.what.strip() and deviation.why.strip(), name
        path, _, test = card.reference_test.partition("::")
        function, _, case = test.partition("[")
        if path not in defined:
            tree = ast.parse((ROOT / path).read_text())
            defined[path] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert function in defined[path], (name, card.reference_test)
        if case:
            assert case.rstrip("]") in TRAINED, (name, card.reference_test)
