"""Methods that reuse the jointly trained W: Joint, tau-normalization (Eq. 3), post-hoc logit adjustment, and the
sweep-tau study. Each grid point costs an O(N*C) rescale or shift of cached logits, never a GEMM."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, Param
from ltcache.heads import LinearHead
from ltcache.metrics.accuracy import GroupAccuracy, evaluate, per_class_accuracy, to_numpy, top_k_hits_array
from ltcache.metrics.priors import parse_prior, prior_accuracy, shifted_priors
from ltcache.stage2.cards import CLASSIFIER_BALANCING, DECOUPLING, KANG_2020, Card, Deviation
from ltcache.stage2.core import Figure, Fitted, LabData, method

if TYPE_CHECKING:
    import torch

    from ltcache.cache import Split

TAU_NORM = "tau_norm"  # the method `ltcache sweep-tau` fits (lab.sweep_tau)
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0, 0.1, ..., 2.0


def validate_taus(taus, label: str = "--taus") -> tuple[float, ...]:
    """A non-empty grid of finite taus >= 0, of at most MAX_GRID_POINTS points (params.py)."""
    return TAUS.check(taus, label)


def weight_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_j|| of every class row, floored at 1e-12."""
    return weight.norm(dim=1).clamp_min(1e-12)


MAX_LOG_SCALE = 30 * 2.302585092994046  # ||w_j||^-tau kept within 1e±30: float32 logits stay finite


def check_finite_scales(norms, taus) -> None:
    """Refuse a tau for which ||w_j||^-tau leaves float32 (1e6 on norms below 1 gives inf, and the argmax over inf
    and NaN logits would be chosen as if it meant something). `norms`: a tensor or a numpy array."""
    norms = to_numpy(norms)
    span = float(np.abs(np.log(norms.astype(np.float64))).max())
    bad = [tau for tau in taus if tau * span > MAX_LOG_SCALE]
    if bad:
        raise LtcacheError(f"tau = {bad[0]:g} scales the classes by ||w_j||^-tau beyond float32 for these weights "
                           f"(norms {float(norms.min()):.3g} to {float(norms.max()):.3g}); use taus up to "
                           f"{MAX_LOG_SCALE / span:.3g}")


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3: w_j / ||w_j||^tau. tau = 0 leaves W as is; tau = 1 gives unit-norm rows."""
    return weight / weight_norms(weight).pow(tau)[:, None]


SWEEP_CHUNK_ROWS = 256  # rows x classes of float32 that stay in a core's cache while every grid point is scored


def affine_argmax(raw: torch.Tensor, scales: torch.Tensor | None, shifts: torch.Tensor | None) -> torch.Tensor:
    """argmax_j(raw_ij * scales[p, j] + shifts[p, j]) for every grid point p: predictions [P, N].

    On CPU the points are scored by affine_argmax_numpy (one pass over `raw`); on a GPU, point by point.
    """
    import torch

    points = len(scales if scales is not None else shifts)
    if raw.device.type != "cpu":
        return torch.stack([(raw * scales[p] if scales is not None else raw)
                            .add(shifts[p] if shifts is not None else 0).argmax(1) for p in range(points)])
    return torch.from_numpy(affine_argmax_numpy(raw.numpy(), None if scales is None else scales.cpu().numpy(),
                                                None if shifts is None else shifts.cpu().numpy(),
                                                threads=torch.get_num_threads()))


def affine_argmax_numpy(values: np.ndarray, scale: np.ndarray | None, shift: np.ndarray | None, *,
                        threads: int | None = None) -> np.ndarray:
    """affine_argmax over float32 numpy arrays: predictions [P, N] int64.

    Rows are taken a cache-sized chunk at a time and every point is scored while the chunk is hot (one pass over
    `values` in all), with numpy's argmax (several times faster than torch's on CPU) and `threads` threads (default:
    the CPU count); float32 arithmetic as torch.mul / torch.add, so the result is the same bit for bit.
    """
    points = len(scale if scale is not None else shift)
    predictions = np.empty((points, len(values)), dtype=np.int64)

    def rows(first: int, last: int) -> None:
        buffer = np.empty((SWEEP_CHUNK_ROWS, values.shape[1]), dtype=np.float32)
        for start in range(first, last, SWEEP_CHUNK_ROWS):
            chunk = values[start : min(start + SWEEP_CHUNK_ROWS, last)]
            out = buffer[: len(chunk)]
            for p in range(points):
                if scale is not None:
                    np.multiply(chunk, scale[p], out=out)
                    if shift is not None:
                        np.add(out, shift[p], out=out)
                else:
                    np.add(chunk, shift[p], out=out)
                predictions[p, start : start + len(chunk)] = out.argmax(1)

    threads = threads if threads is not None else (os.cpu_count() or 1)
    workers = max(1, min(threads, len(values) // SWEEP_CHUNK_ROWS))
    bounds = np.linspace(0, len(values), workers + 1).astype(int)
    if workers == 1:
        rows(0, len(values))
    else:
        with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL in both loops
            list(pool.map(rows, bounds[:-1], bounds[1:]))
    return predictions


def grid_curve(data: LabData, split: str, grid: list[dict], *, scales=None, shifts=None, prior=None) -> list[dict]:
    """Metrics on `split` for every point of `grid`, whose logits are raw * scales[p] + shifts[p] ([P, C] each;
    either may be None).

    raw = F @ W.T is computed once per split; the points cost an O(N*C) rescale or shift each (affine_argmax),
    never a GEMM. With a class `prior`, each entry also has its target_accuracy, sum_c prior_c acc_c.
    """
    import torch

    from ltcache.logits import BlockLogits

    raw = data.raw_logits(split)
    if isinstance(raw, BlockLogits):  # beyond the memory budget: every point scored on each block in turn
        predictions = torch.cat([affine_argmax(block, scales, shifts) for block in raw.blocks()], dim=1)
    else:
        predictions = affine_argmax(raw, scales, shifts)
    return [{**point, **data.score(predictions[p], split, prior)} for p, point in enumerate(grid)]


def sweep_tau_arrays(selection: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                     weight: np.ndarray, class_counts, taus, *, thresholds, budget: int,
                     product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                     ) -> tuple[list[dict], dict, GroupAccuracy]:
    """`ltcache sweep-tau` over numpy arrays (FeatureCache.read_split): the tau curve of Eq. 3 on the selection rows,
    its best entry (best_on_curve: mean per-class accuracy, ties toward the smaller tau), and the test accuracy of
    the tau-normalized head at that tau, top-5 included.

    It costs one product over the selection rows, computed block by block within `budget` bytes of logits with every
    tau scored on each block while it is hot (affine_argmax_numpy), and one product over test for the chosen tau.
    `product(rows, weight)` returns float32 logits rows @ weight.T; the default is numpy's float32 matmul (a float16
    cache's rows upcast a block at a time), which needs no torch (logits.matrix_product gives bf16 or a GPU).
    """
    from ltcache.logits import block_rows

    product = product or _float32_product
    taus = validate_taus(taus)
    weight = np.asarray(weight, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(weight, axis=1), np.float32(1e-12))
    check_finite_scales(norms, taus)
    rows = block_rows(len(weight), budget)
    features, labels = selection
    scales = np.stack([norms ** np.float32(-tau) for tau in taus]).astype(np.float32)
    blocks = [affine_argmax_numpy(product(features[start : start + rows], weight), scales, None)
              for start in range(0, len(features), rows)]
    predictions = np.concatenate(blocks, axis=1) if blocks else np.empty((len(taus), 0), dtype=np.int64)
    curve = [{"tau": tau, **evaluate(predictions[p], labels, class_counts, thresholds)} for p, tau in enumerate(taus)]
    best = best_on_curve(curve)
    normalized = weight / (norms ** np.float32(best["tau"]))[:, None]
    features, labels = test
    chosen, hits = [], 0
    for start in range(0, len(features), rows):
        logits = product(features[start : start + rows], normalized)
        chosen.append(logits.argmax(1))
        hits += int(top_k_hits_array(logits, labels[start : start + rows], 5).sum())
    predictions = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    accuracy = GroupAccuracy(**evaluate(predictions, labels, class_counts, thresholds))
    return curve, best, replace(accuracy, top5=100.0 * hits / len(labels) if len(labels) else float("nan"))


def _float32_product(rows: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32) @ weight.T


def log_prior(data: LabData, device) -> torch.Tensor:
    """log of the train class prior n_c / N (counts floored at 1)."""
    import torch

    counts = torch.as_tensor(data.class_counts, dtype=torch.float32, device=device).clamp_min(1)
    return torch.log(counts / counts.sum())


def tau_curve(data: LabData, split: str, taus) -> list[dict]:
    """Metrics of the tau-normalized head (Eq. 3) for every tau on `split`: column j scaled by ||w_j||^-tau."""
    import torch

    norms = weight_norms(data.joint.weight).to(data.split(split).features.device)
    taus = validate_taus(taus)
    check_finite_scales(norms, taus)
    return grid_curve(data, split, [{"tau": tau} for tau in taus], scales=torch.stack([norms.pow(-t) for t in taus]))


def best_on_curve(curve: list[dict], key: str = "mean_per_class") -> dict:
    """The entry with the highest score; ties resolve toward the smallest parameters (the least change)."""
    return max(curve, key=lambda entry: (entry[key], *(-entry[p] for p in ("tau", "la_tau") if p in entry)))


def chosen_on_grid(data: LabData, best: dict, *keys: str) -> dict:
    """What a grid search chose (`keys` of the best entry), on which split, and the score there."""
    return {**{key: best[key] for key in keys}, "selected_on": data.selected_on,
            "selection_mean_per_class": round(best["mean_per_class"], 4)}


JOINT_CARD = Card(
    paper=KANG_2020, title=DECOUPLING, code=f"{CLASSIFIER_BALANCING}: models/DotProductClassifier.py",
    matches=("The linear classifier (W, b) trained jointly with the backbone in stage 1, bias kept.",),
    deviations=(Deviation("From a cache made without a checkpoint (extract --backbone NAME), joint is the model's own "
                          "classifier or an instance-balanced linear probe, as the manifest records.",
                          "A frozen library model has no stage 1; the probe is the instance-balanced classifier "
                          "the decoupled heads are compared with."),),
    reference_test="tests/test_reference.py::test_joint_is_the_stage_one_classifier")


@method("joint", summary="the stage-1 classifier as trained (W, b)", paper=1, weight_norms=True, card=JOINT_CARD,
        task="linear_probe")
def fit_joint(data: LabData) -> Fitted:
    return Fitted(data.joint, {})


TAUS = Param("taus", GRID, DEFAULT_TAUS, "tau grid, chosen on the selection split.", low=0, high=100)


def tau_figure(data: LabData, fitted: Fitted | None) -> list[dict]:
    """The tau curve of Fig. 2 (right) on the selection split: the fitted sweep, or the default grid's."""
    return fitted.curve if fitted is not None else tau_curve(data, data.select, DEFAULT_TAUS)


TAU_CURVE = Figure("tau_curve", "tau", "tau-normalized classifier", tau_figure, always=True)


TAU_NORM_CARD = Card(
    paper=KANG_2020, title=DECOUPLING, code=f"{CLASSIFIER_BALANCING}: tau_norm.py (pnorm)",
    matches=("Eq. 3: w_j / ||w_j||^tau, the bias dropped, over the grid tau = 0, 0.1, ..., 2 (tau_norm.py's "
             "np.linspace(0, 2, 21)).",),
    deviations=(Deviation("tau is chosen on the selection split (val, or the simulated-balanced train set with "
                          "--select train) by mean per-class accuracy, ties toward the smaller tau.",
                          "tau_norm.py prints the whole sweep on the split it is given (test by default), leaving "
                          "the choice to the reader; choosing on test overstates the result (compare "
                          "--protocol-audit measures by how much)."),),
    reference_test="tests/test_reference.py::test_tau_norm_equals_the_official_pnorm_sweep_chosen_on_val")


@method(TAU_NORM, TAUS, summary="W / ||w_j||^tau, bias dropped (Eq. 3); tau chosen on the selection split",
        paper=4, weight_norms=True, figures=(TAU_CURVE,), card=TAU_NORM_CARD)
def fit_tau_norm(data: LabData, *, taus) -> Fitted:
    curve = tau_curve(data, data.select, taus)
    best = best_on_curve(curve)
    head = LinearHead(tau_normalize(data.joint.weight, best["tau"]))
    return Fitted(head, chosen_on_grid(data, best, "tau"), curve)


def adapted_to_shifted_priors(data: LabData, test: Split, params: dict) -> dict:
    """Logit adjustment aimed at each shifted test prior (tau chosen on the selection split reweighted to that
    prior): its accuracy under the prior, beside `shifted_priors`, where every head stays aimed at balance."""
    import torch

    from ltcache.logits import chunk_rows, row_blocks

    raw_test = data.logits(LinearHead(data.joint.weight), test.features)  # one GEMM (or blocks); each prior shifts it
    result = {}
    for name, prior in shifted_priors(data.class_counts).items():
        head = fit_logit_adjustment(data, **{**params, "target": prior}).head
        predictions = torch.cat([(block + head.bias).argmax(1)
                                 for block in row_blocks(raw_test, chunk_rows(data.num_classes))])
        result[name] = prior_accuracy(per_class_accuracy(predictions, test.labels, data.num_classes), prior)
    return result


LOGIT_ADJ_CARD = Card(
    paper="Menon, Jayasumana, Rawat, Jain, Veit & Kumar, ICLR 2021", title="Long-tail learning via logit adjustment",
    code="google-research/google-research: logit_adjustment/main.py",
    matches=("Post-hoc adjustment of the joint logits: z - tau log(train prior), tau on a grid.",),
    deviations=(Deviation("tau is chosen on the selection split (the paper fixes tau = 1 or tunes it); target= aims "
                          "the adjustment at another test prior (+ log target prior), tau then chosen by the "
                          "selection accuracy reweighted to that prior.",
                          "One selection protocol for every method; shifted priors are the paper's Sec. 3 "
                          "generalization."),),
    reference_test="tests/test_reference.py::test_logit_adjustment_equals_a_brute_force_search")


@method("logit_adj", TAUS, Param("target", str, "uniform", "Target prior: uniform, train, forward:F, backward:F, "
                                   "or a .npy / .json / .txt file of class weights."),
          summary="post-hoc logit adjustment (Menon et al. 2021): joint logits - tau log(train prior) + log(target "
          "prior); target uniform, train, forward:F, backward:F or a file",
          check=lambda params, counts: parse_prior(params["target"], counts),
          analyses={"shifted_priors_adapted": adapted_to_shifted_priors}, card=LOGIT_ADJ_CARD)
def fit_logit_adjustment(data: LabData, *, taus, target) -> Fitted:
    """With a non-uniform target prior, tau is chosen by the selection split's accuracy reweighted to that prior
    (sum_c pi_c acc_c), the accuracy a test set drawn from the prior would give."""
    import torch

    prior = log_prior(data, data.joint.weight.device)
    target_prior = None if isinstance(target, str) and target == "uniform" else parse_prior(target, data.class_counts)
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros_like(prior)
    if target_prior is not None:
        bias = bias + torch.as_tensor(target_prior, dtype=prior.dtype, device=prior.device).clamp_min(1e-30).log()
    taus = validate_taus(taus)
    curve = grid_curve(data, data.select, [{"la_tau": t} for t in taus],
                       shifts=torch.stack([bias - t * prior for t in taus]), prior=target_prior)
    key = "mean_per_class" if target_prior is None else "target_accuracy"
    best = best_on_curve(curve, key)
    head = LinearHead(data.joint.weight, bias - best["la_tau"] * prior)
    chosen = chosen_on_grid(data, best, "la_tau")
    if target_prior is not None:
        chosen.update(target=target if isinstance(target, str) else "array",
                      selection_target_accuracy=round(best["target_accuracy"], 4))
    return Fitted(head, chosen, curve)


TAU_NORM_LA_CARD = Card(
    paper="ltcache's combination of Kang et al., ICLR 2020 (Eq. 3) and Menon et al., ICLR 2021",
    code=None,
    matches=("tau-normalized W (bias dropped), then - la_tau log(train prior), both chosen on one grid.",),
    reference_test="tests/test_reference.py::test_tau_norm_la_equals_a_brute_force_search")


@method("tau_norm_la", TAUS, Param("la_taus", GRID, tuple(0.25 * i for i in range(9)), "Logit-adjustment grid.",
                                     low=0),
          summary="tau-normalization, then post-hoc logit adjustment; both chosen on one grid",
          card=TAU_NORM_LA_CARD)
def fit_tau_norm_logit_adjustment(data: LabData, *, taus, la_taus) -> Fitted:
    import torch

    prior = log_prior(data, data.joint.weight.device)
    norms = weight_norms(data.joint.weight)
    grid = [{"tau": t, "la_tau": a} for t in validate_taus(taus) for a in validate_taus(la_taus)]
    check_finite_scales(norms, taus)
    curve = grid_curve(data, data.select, grid, scales=torch.stack([norms.pow(-p["tau"]) for p in grid]),
                       shifts=torch.stack([-p["la_tau"] * prior for p in grid]))
    best = best_on_curve(curve)
    head = LinearHead(tau_normalize(data.joint.weight, best["tau"]), -best["la_tau"] * prior)
    return Fitted(head, chosen_on_grid(data, best, "tau", "la_tau"), curve)
