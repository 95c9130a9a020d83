"""Stage-1 losses that long-tail papers compare against, in a registry: `build_loss(name, class_counts, params)`.

Each takes (logits, targets) and returns the batch mean. Losses with per-class weights accept `drw_epoch`:
deferred re-weighting (Cao et al. 2019) keeps uniform weights before that epoch and switches to the
class-balanced weights of Cui et al. (2019) from it on; `set_epoch` is called by the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ltcache.core.errors import LtcacheError
from ltcache.core.params import Param
from ltcache.core.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

# name -> (factory(class_counts, **params) -> nn.Module, declared parameters). Names and parameters need no torch;
# the factories import the modules (loss_modules.py) when a loss is built.
LOSSES: Registry[tuple[Callable[..., nn.Module], tuple[Param, ...]]] = Registry("loss")


def loss(name: str, *params: Param):
    """Register factory(class_counts, **params) -> nn.Module as loss `name` with its declared parameters."""
    return LOSSES.register(name, lambda factory: (factory, params))


_GAMMA = Param("gamma", float, 1.0, "Focal exponent (Lin et al. 2017).", low=0)
_BETA = Param("beta", float, 0.9999, "Class-balanced beta: the effective number (Cui et al. 2019).", low=0, below=1)
_DRW = Param("drw_epoch", int, None, "Deferred re-weighting from this epoch on (LDAM-DRW).", low=0,
             high=100_000, optional=True)
_TAU = Param("tau", float, 1.0, "Logit-adjustment strength (Menon et al. 2021).", low=0)


def class_balanced_weights(class_counts, beta: float) -> torch.Tensor:
    """Cui et al. 2019: w_c ∝ (1-β) / (1-β^n_c), normalized to sum to the number of classes."""
    from ltcache.stage1.losses.modules import class_balanced_weights as weights

    return weights(class_counts, beta)


@loss("ce", _DRW)
def cross_entropy(class_counts, **params) -> nn.Module:
    """Softmax cross-entropy (with drw_epoch: deferred re-weighting)."""
    from ltcache.stage1.losses.modules import CrossEntropy

    return CrossEntropy(class_counts, **params)


@loss("focal", _GAMMA, _DRW)
def focal(class_counts, **params) -> nn.Module:
    """Focal loss (Lin et al. 2017)."""
    from ltcache.stage1.losses.modules import Focal

    return Focal(class_counts, **params)


@loss("cb_ce", _BETA)
def class_balanced_cross_entropy(class_counts, **params) -> nn.Module:
    """Class-balanced CE (Cui et al. 2019)."""
    from ltcache.stage1.losses.modules import CrossEntropy

    return CrossEntropy(class_counts, **params)


@loss("cb_focal", _GAMMA, _BETA)
def class_balanced_focal(class_counts, **params) -> nn.Module:
    """Class-balanced focal loss (Cui et al. 2019)."""
    from ltcache.stage1.losses.modules import Focal

    return Focal(class_counts, **params)


@loss("ldam", Param("max_margin", float, 0.5, "Largest class margin (Cao et al. 2019).", above=0),
      Param("s", float, 1.0, "Logit scale.", above=0), _DRW)
def ldam(class_counts, **params) -> nn.Module:
    """LDAM (Cao et al. 2019); with drw_epoch, LDAM-DRW."""
    from ltcache.stage1.losses.modules import LDAM

    return LDAM(class_counts, **params)


@loss("balanced_softmax")
def balanced_softmax(class_counts, **params) -> nn.Module:
    """Balanced Softmax (Ren et al. 2020): logit adjustment with tau fixed at 1."""
    from ltcache.stage1.losses.modules import LogitAdjusted

    return LogitAdjusted(class_counts, **params)


@loss("logit_adjusted", _TAU)
def logit_adjusted(class_counts, **params) -> nn.Module:
    """Logit-adjusted CE (Menon et al. 2021)."""
    from ltcache.stage1.losses.modules import LogitAdjusted

    return LogitAdjusted(class_counts, **params)


def loss_params(name: str) -> dict[str, Param]:
    """The declared parameters of a registered loss, by name."""
    return {param.name: param for param in LOSSES[name][1]}


def build_loss(name: str, class_counts, params: dict | None = None) -> nn.Module:
    """A registered loss with its defaults updated by `params` (unknown keys and bad values are errors)."""
    declared = loss_params(name)
    unknown = sorted(set(params or {}) - set(declared))
    if name == "balanced_softmax" and unknown == ["tau"]:
        raise LtcacheError("balanced_softmax is logit adjustment with tau = 1; use --loss logit_adjusted for others")
    if unknown:
        raise LtcacheError(f"loss {name} has no parameter {unknown[0]!r}; it has {', '.join(declared) or 'none'}")
    merged = {key: param.default for key, param in declared.items()}
    merged.update({key: declared[key].check(value, f"loss parameter {key}") for key, value in (params or {}).items()})
    return LOSSES[name][0](class_counts, **merged)
