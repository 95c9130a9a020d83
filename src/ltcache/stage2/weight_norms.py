"""Methods that reuse the jointly trained W: Joint, tau-normalization (Eq. 3)."""

from __future__ import annotations

import torch

from ltcache.errors import LtcacheError
from ltcache.stage2.core import Fitted, LabData, LinearHead, register

DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0, 0.1, ..., 2.0


def validate_taus(taus) -> tuple[float, ...]:
    taus = tuple(float(t) for t in taus)
    if not taus:
        raise LtcacheError("the tau grid is empty; pass values such as --taus 0,0.1,0.5,1")
    if any(t < 0 for t in taus):
        raise LtcacheError(f"the tau grid has negative values {[t for t in taus if t < 0]}; tau must be >= 0")
    return taus


def weight_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.norm(dim=1).clamp_min(1e-12)


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3: w_j / ||w_j||^tau. tau = 0 leaves W as is; tau = 1 gives unit-norm rows."""
    return weight / weight_norms(weight).pow(tau)[:, None]


def tau_curve(data: LabData, split: str, taus) -> list[dict]:
    """Metrics of the tau-normalized head for every tau on `split`.

    The raw logits F @ W.T are computed once; each tau only rescales column j by ||w_j||^-tau (O(N*C)).
    """
    raw = data.raw_logits(split)
    norms = weight_norms(data.joint.weight).to(raw.device)
    return [{"tau": tau, **data.score((raw / norms.pow(tau)).argmax(1), split)} for tau in validate_taus(taus)]


def best_on_curve(curve: list[dict], key: str = "mean_per_class") -> dict:
    """The first (smallest-tau) entry with the highest score: ties resolve toward the least change to W."""
    return max(curve, key=lambda entry: (entry[key], -entry["tau"]))


@register("joint", summary="the stage-1 classifier as trained (W, b)")
def fit_joint(data: LabData) -> Fitted:
    return Fitted(data.joint, {})


@register("tau_norm", summary="W / ||w_j||^tau, bias dropped (Eq. 3); tau chosen on the selection split",
          taus=DEFAULT_TAUS)
def fit_tau_norm(data: LabData, *, taus) -> Fitted:
    curve = tau_curve(data, data.select, taus)
    best = best_on_curve(curve)
    head = LinearHead(tau_normalize(data.joint.weight, best["tau"]))
    return Fitted(head, {"tau": best["tau"], "selected_on": data.select,
                         "selection_mean_per_class": round(best["mean_per_class"], 4)}, curve)
