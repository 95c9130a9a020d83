"""Stage-2 core: what a method may see (LabData), what it returns (Fitted: a head from heads.py), the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ltcache.cache import Split
from ltcache.errors import LtcacheError, unknown_name
from ltcache.heads import Head, LinearHead
from ltcache.metrics import ShotThresholds, evaluate, per_class_accuracy, prior_accuracy
from ltcache.params import Param

SELECTION_SPLITS = ("val", "train")


@dataclass
class LabData:
    """What a stage-2 method may see: train, val and the joint head. Test is absent by construction."""

    train: Split
    val: Split | None
    joint: LinearHead
    class_counts: np.ndarray
    select: str = "val"
    seed: int = 0
    thresholds: ShotThresholds = field(default_factory=ShotThresholds)
    train_views: Split | None = None  # K augmented views per train image: row k * len(train) + i
    _raw_logits: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.select not in SELECTION_SPLITS:
            raise unknown_name("selection split", self.select, SELECTION_SPLITS)
        if self.select == "val" and self.val is None:
            raise LtcacheError("the cache has no val split to select on; pass --select train")

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "train_views": self.train_views}[name]

    @property
    def fitting(self) -> str:
        """The rows that trained heads fit on: the augmented train views when the cache has them, else train."""
        return "train" if self.train_views is None else "train_views"

    @property
    def views(self) -> int:
        return 0 if self.train_views is None else len(self.train_views) // len(self.train)

    def raw_logits(self, name: str) -> torch.Tensor:
        """F @ W_joint.T without bias, computed once per split and shared by tau_norm and LWS."""
        if name not in self._raw_logits:
            self._raw_logits[name] = LinearHead(self.joint.weight).logits(self.split(name).features)
        return self._raw_logits[name]

    def clear_cached_logits(self) -> None:
        self._raw_logits.clear()

    @property
    def selection(self) -> Split:
        """The split that hyperparameters are chosen on: val, or train with --select train."""
        return self.split(self.select)

    def score(self, predictions: torch.Tensor, name: str, prior=None) -> dict:
        """Metrics of `predictions` on split `name`; with a class prior, also target_accuracy = sum_c prior_c acc_c."""
        labels = self.split(name).labels
        result = evaluate(predictions, labels, self.class_counts, self.thresholds)
        if prior is not None:
            result["target_accuracy"] = prior_accuracy(per_class_accuracy(predictions, labels, self.num_classes), prior)
        return result


@dataclass
class Fitted:
    """A fitted method: its head, the hyperparameters used or chosen (and on what), and any sweep it ran."""

    head: Head
    chosen: dict
    curve: list[dict] | None = None


@dataclass(frozen=True)
class Method:
    """A registered method: its fit function, its declared hyperparameters and what it is."""

    name: str
    fit: Callable[..., Fitted]
    params: tuple[Param, ...]
    summary: str
    stochastic: bool = False  # trained with SGD from a seed: compare --seeds N refits it N times
    check: Callable[[dict, np.ndarray], object] | None = None  # check(params, class_counts) before any fitting

    @property
    def defaults(self) -> dict:
        return {param.name: param.default for param in self.params}


METHODS: dict[str, Method] = {}


def register(name: str, *params: Param, summary: str, stochastic: bool = False, check=None):
    """Register `fit(data: LabData, **hyperparameters) -> Fitted` under `name` with its declared hyperparameters
    (type, range, default, help: params.py). `check(params, class_counts)` raises LtcacheError for values only the
    cache can judge, before any fit."""

    def wrap(fit: Callable[..., Fitted]) -> Callable[..., Fitted]:
        METHODS[name] = Method(name, fit, tuple(params), summary, stochastic, check)
        return fit

    return wrap


def with_defaults(params: tuple[Param, ...], **defaults) -> tuple[Param, ...]:
    """The same declarations with other defaults (a method that trains longer, or without weight decay)."""
    known = {param.name for param in params}
    unknown = set(defaults) - known
    if unknown:
        raise KeyError(f"no declared hyperparameter {sorted(unknown)[0]!r}")
    return tuple(replace(param, default=defaults[param.name]) if param.name in defaults else param
                 for param in params)


def resolve_params(name: str, overrides: dict | None = None) -> dict:
    """A method's defaults updated by `overrides`, each checked against its declaration: command-line text is
    parsed strictly (with_bias=ture is an error), Python values must have the declared type."""
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    declared = {param.name: param for param in METHODS[name].params}
    values = dict(METHODS[name].defaults)
    for key, value in (overrides or {}).items():
        if key not in declared:
            raise LtcacheError(f"method {name} has no hyperparameter {key!r}; it has {', '.join(declared) or 'none'}")
        label = f"{name}.{key}"
        values[key] = declared[key].parse(value, label) if isinstance(value, str) else declared[key].check(value, label)
    return values


def fit_method(name: str, data: LabData, overrides: dict | None = None) -> Fitted:
    """Fit a registered method with its defaults updated by `overrides`."""
    return METHODS[name].fit(data, **resolve_params(name, overrides))
