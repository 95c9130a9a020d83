"""Stage-2 core: every method returns a LinearHead; one evaluator scores any head; a registry of methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ltcache.cache import Split
from ltcache.errors import LtcacheError, unknown_name
from ltcache.metrics import ShotThresholds, evaluate

SELECTION_SPLITS = ("val", "train")
LOGIT_CHUNK_ROWS = 65536


@dataclass
class LinearHead:
    """logits = normalize?(f - center) @ weight.T + bias. weight [C, d]; bias [C], center [d] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    normalize_input: bool = False
    center: torch.Tensor | None = None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for all rows, computed in chunks so a large split never needs a second copy of its features."""
        weight = self.weight.to(features.device)
        out = []
        for chunk in features.split(LOGIT_CHUNK_ROWS):
            if self.center is not None:
                chunk = chunk - self.center.to(features.device)
            if self.normalize_input:
                chunk = F.normalize(chunk, dim=1)
            logits = chunk @ weight.T
            out.append(logits if self.bias is None else logits + self.bias.to(features.device))
        return torch.cat(out) if out else features.new_empty((0, len(weight)))

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)


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
        return {"train": self.train, "val": self.val}[name]

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

    def score(self, predictions: torch.Tensor, name: str) -> dict:
        return evaluate(predictions, self.split(name).labels, self.class_counts, self.thresholds)


@dataclass
class Fitted:
    """A fitted method: its head, the hyperparameters used or chosen (and on what), and any sweep it ran."""

    head: LinearHead
    chosen: dict
    curve: list[dict] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fit: Callable[..., Fitted]
    defaults: dict
    summary: str
    stochastic: bool = False  # trained with SGD from a seed: compare --seeds N refits it N times


METHODS: dict[str, Method] = {}


def register(name: str, *, summary: str, stochastic: bool = False, **defaults):
    """Register `fit(data: LabData, **hyperparameters) -> Fitted` under `name` with its default hyperparameters."""

    def wrap(fit: Callable[..., Fitted]) -> Callable[..., Fitted]:
        METHODS[name] = Method(name, fit, defaults, summary, stochastic)
        return fit

    return wrap


def coerce(value, default):
    """Turn a command-line string into the type of the default value."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float) or default is None:
        return float(value)
    if isinstance(default, tuple):
        return tuple(float(v) for v in value.split(",") if v.strip())
    return value


def resolve_params(name: str, overrides: dict | None = None) -> dict:
    """A method's defaults updated by `overrides`, coerced to the defaults' types; bad names are errors."""
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    params = dict(METHODS[name].defaults)
    for key, value in (overrides or {}).items():
        if key not in params:
            raise LtcacheError(f"method {name} has no hyperparameter {key!r}; it has "
                               f"{', '.join(params) or 'none'}")
        try:
            params[key] = coerce(value, params[key])
        except ValueError:
            raise LtcacheError(f"{name}.{key}={value!r} is not a valid value (default {params[key]!r})") from None
    return params


def fit_method(name: str, data: LabData, overrides: dict | None = None) -> Fitted:
    """Fit a registered method with its defaults updated by `overrides`."""
    return METHODS[name].fit(data, **resolve_params(name, overrides))
