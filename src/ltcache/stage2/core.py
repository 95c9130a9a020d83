"""Stage-2 core: what a method may see (LabData), what it returns (Fitted: a head from heads.py), and the method
registry with each method's metadata. The registry is the only place that knows a method: the lab, the reports and
the command line read the metadata and name none.

Importing this module does not import torch: `ltcache methods` lists every method from the metadata alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ltcache.core.errors import LtcacheError, unknown_name
from ltcache.core.params import Param
from ltcache.core.registry import Registry
from ltcache.metrics.accuracy import ShotThresholds, evaluate, per_class_accuracy
from ltcache.metrics.priors import prior_accuracy
from ltcache.stage2.cards import Card

if TYPE_CHECKING:
    import torch

    from ltcache.cache import Split
    from ltcache.heads import Head, LinearHead

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
    memory_budget: int | None = None  # bytes a split's logits may take whole (logits.py); None: the default
    text: LinearHead | None = None  # CLIP's zero-shot text head (extract --zero-shot), on normalized features
    selection_name: str | None = None  # what the selection split is, when not `select` (the protocol audit: test)
    precision: str = "float32"  # of the trained heads' products: float32, or bf16 (fitting.lower_precision)
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

    @property
    def budget(self) -> int:
        """The memory budget in bytes: what one split's logits may take whole."""
        from ltcache.logits import resolve_budget

        if self.memory_budget is None:
            self.memory_budget = resolve_budget(None)
        return self.memory_budget

    def logits(self, head: Head, features: torch.Tensor):
        """The logits of `head` over `features`: a tensor when they fit the memory budget, else a BlockLogits
        that computes them block by block (logits.py; read either with row_blocks)."""
        from ltcache.logits import logits_within

        return logits_within(head, features, self.budget)

    def raw_logits(self, name: str, bias: torch.Tensor | None = None):
        """F @ W_joint.T (+ `bias`) of split `name`. When it fits the memory budget, the bias-free product is
        computed once per split and shared by the methods that rescale or shift it; otherwise it is a BlockLogits,
        computed block by block (or batch by batch, when a trainer gathers rows) each time it is read."""
        from ltcache.core.distributed import get_world_size
        from ltcache.heads import LinearHead
        from ltcache.logits import BlockLogits, block_rows

        if name not in self._raw_logits:
            head, features = LinearHead(self.joint.weight), self.split(name).features
            if name == self.fitting and get_world_size() > 1:  # under torchrun a rank trains on its own rows: per batch
                self._raw_logits[name] = BlockLogits(head, features, block_rows(head.num_classes, self.budget))
            else:
                self._raw_logits[name] = self.logits(head, features)
        raw = self._raw_logits[name]
        if bias is None:
            return raw
        if isinstance(raw, BlockLogits):
            return raw.with_bias(bias)
        if bias is not self.joint.bias:
            return raw + bias
        # with the joint bias (LWS with_bias, DisAlign): kept too, so the points of a grid share one tensor
        key = f"{name}+joint_bias"
        if key not in self._raw_logits:
            self._raw_logits[key] = raw + bias
        return self._raw_logits[key]

    def clear_cached_logits(self) -> None:
        self._raw_logits.clear()

    @property
    def selected_on(self) -> str:
        """The name every choice records as `selected_on`: val, train, or test for the protocol audit's refit."""
        return self.selection_name or self.select

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

    def selection_score(self, head: Head) -> float:
        """Mean per-class accuracy of `head` on the selection split: what every choice among fitted heads uses."""
        return self.score(head.predict(self.selection.features), self.select)["mean_per_class"]


@dataclass
class Fitted:
    """A fitted method: its head, the hyperparameters used or chosen (and on what), and any sweep it ran."""

    head: Head
    chosen: dict
    curve: list[dict] | None = None
    method: str | None = None  # the registered name, set by fit_method
    losses: list[float] | None = None  # the mean training loss of each epoch of a trained head (set by the lab)


@dataclass(frozen=True)
class Figure:
    """A selection curve a method contributes to the reports (paper Fig. 2, right, for tau-normalization): its
    `compute(data, fitted)` returns the curve entries (each with `param` and the accuracy keys) on the selection
    split. `always`: computed from the joint head even when the method is not among those run (it costs no fit)."""

    name: str
    param: str
    title: str
    compute: Callable[[LabData, Fitted | None], list[dict]]
    always: bool = False


@dataclass(frozen=True)
class Method:
    """A registered method: its fit function, its declared hyperparameters and what it is.

    - `paper`: its row in the paper's Table 2 (1-5) when it is one of the paper's five, else None. The paper's
      five are what compare runs by default.
    - `stochastic`: fitted by SGD from a seed; compare --seeds N refits it N times.
    - `weight_norms`: its per-class weight norms go into the weight-norm plot (Fig. 2, left).
    - `figures`: selection curves it contributes to the reports.
    - `analyses`: extra analyses, name -> fn(data, test, params) -> dict, added to its row under that name.
    - `check(params, class_counts)`: raises LtcacheError for values only the cache can judge, before any fit.
    - `text`: it needs the cache's zero-shot text head (extract --zero-shot); `--methods all` leaves it out on a
      cache without one.
    - `card`: where it comes from (paper, official code, deviations, reference test; stage2/cards.py). None: a
      method registered without one, listed as such.
    - `task`: the task CLIP_benchmark would file its rows under (zeroshot_classification, linear_probe), for the
      report's clip_benchmark.csv; None: ltcache/NAME.
    - `plan(data, **params) -> Plan`: what it trains, as data (stage2/training.py), so that the points of a grid
      and the seeds of --seeds train in one pass. None (a plugin's method): fitted point by point with `fit`.
    """

    name: str
    fit: Callable[..., Fitted]
    params: tuple[Param, ...]
    summary: str
    paper: int | None = None
    stochastic: bool = False
    weight_norms: bool = False
    figures: tuple[Figure, ...] = ()
    analyses: dict[str, Callable[..., dict]] = field(default_factory=dict)
    check: Callable[[dict, np.ndarray], Any] | None = None
    text: bool = False
    card: Card | None = None
    plan: Callable[..., Any] | None = None
    task: str | None = None  # CLIP_benchmark's task name for its rows (report's clip_benchmark.csv)

    @property
    def defaults(self) -> dict:
        return {param.name: param.default for param in self.params}

    @property
    def curve(self) -> bool:
        """Whether the method chooses on a grid itself and returns that selection curve (Fitted.curve)."""
        return bool(self.figures)


METHODS: Registry[Method] = Registry("method", builtins=("ltcache.stage2.methods",), reserved=("all",))


def method(name: str, *params: Param, summary: str, paper: int | None = None, stochastic: bool = False,
           weight_norms: bool = False, figures: tuple[Figure, ...] = (), analyses: dict | None = None,
           check=None, text: bool = False, card: Card | None = None, replace: bool = False, plan=None,
           task: str | None = None):
    """Register `fit(data: LabData, **hyperparameters) -> Fitted` as stage-2 method `name`.

    Each hyperparameter is a `Param` (type, default, range or choices, help): `compare --set NAME.KEY=VALUE` and
    `Lab.fit(name, key=value)` are checked against it, and comma lists on the command line become grids. `card` (an
    ltcache.Card) says where the method comes from: its paper, the official code, each deviation and its reason,
    and the test against a reference computation. The other keyword metadata is described on `Method`. Returns
    the decorator; the function is registered unchanged."""
    if not isinstance(name, str) or not name.isidentifier():
        raise LtcacheError(f"method name {name!r} must be an identifier (letters, digits, _), e.g. my_head")
    for param in params:
        if not isinstance(param, Param):
            raise LtcacheError(f"method {name}: hyperparameters are ltcache.Param declarations, got {param!r}")
    if card is not None and not isinstance(card, Card):
        raise LtcacheError(f"method {name}: card= takes an ltcache.Card(paper=..., code=..., ...), got "
                           f"{type(card).__name__}")

    METHODS.load()  # the built-ins first (a no-op while they register): a clash with one of them is refused here

    def wrap(fit: Callable[..., Fitted]) -> Callable[..., Fitted]:
        # The same function defined again (a notebook cell run twice, a reloaded module) replaces its old self.
        existing = METHODS.entries.get(name)
        again = existing is not None and _origin(existing.fit) == _origin(fit) != (None, None)
        METHODS.add(name, Method(name, fit, tuple(params), summary, paper, stochastic, weight_norms, tuple(figures),
                                 dict(analyses or {}), check, text, card, plan, task), replace=replace or again)
        return fit

    return wrap


def _origin(fn: Callable) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def with_defaults(params: tuple[Param, ...], **defaults) -> tuple[Param, ...]:
    """The same declarations with other defaults (a method that trains longer, or without weight decay)."""
    known = {param.name for param in params}
    unknown = set(defaults) - known
    if unknown:
        raise KeyError(f"no declared hyperparameter {sorted(unknown)[0]!r}")
    return tuple(replace(param, default=defaults[param.name]) if param.name in defaults else param
                 for param in params)


def method_names() -> list[str]:
    """Every registered method: the paper's five in Table 2's order, then the others in registration order."""
    names = METHODS.names()
    return sorted(names, key=lambda n: (METHODS[n].paper is None, METHODS[n].paper or 0, names.index(n)))


def paper_methods() -> list[str]:
    """The paper's five (Table 2's rows), what compare runs by default."""
    return [name for name in method_names() if METHODS[name].paper is not None]


def resolve_method_list(text: str | list[str] | None) -> list[str]:
    """None -> the paper's five; 'all' -> every registered method; else a comma-separated list (or a list)."""
    if not text:
        return paper_methods()
    if isinstance(text, str):
        if text.strip() == "all":
            return method_names()
        text = [m.strip() for m in text.split(",") if m.strip()]
    names = list(text)
    for name in names:
        METHODS.get(name)  # an unknown name is a one-line error listing the known ones
    if len(set(names)) != len(names):
        raise LtcacheError(f"--methods names {next(n for n in names if names.count(n) > 1)!r} twice; give each once")
    return names


def resolve_params(name: str, overrides: dict | None = None) -> dict:
    """A method's defaults updated by `overrides`, each checked against its declaration: command-line text is
    parsed strictly (with_bias=ture is an error), Python values must have the declared type."""
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
    return run_fit(name, data, resolve_params(name, overrides))


def check_data(name: str, data: LabData) -> None:
    """What method `name` needs from the cache beyond train, val and the joint head (CLIP's text head)."""
    if METHODS[name].text and data.text is None:
        raise LtcacheError(f"method {name} needs CLIP's zero-shot text head, which this cache lacks; extract with "
                           "--backbone open_clip:ARCH/TAG --zero-shot")


def run_fit(name: str, data: LabData, params: dict) -> Fitted:
    """Call method `name`'s fit with resolved `params` and check what it returns: a Fitted holding a Head and a
    dict of what it chose (a user method that returns something else is a one-line error naming it)."""
    check_data(name, data)
    fit = METHODS[name].fit
    trusted = getattr(fit, "__module__", "").startswith("ltcache.")
    before = None if trusted else shared_fingerprint(data)
    fitted = fit(data, **params)
    if before is not None and shared_fingerprint(data) != before:
        raise LtcacheError(f"method {name} changed the shared features, labels or joint head in place; a method must "
                           "not modify its inputs (copy them first, e.g. data.train.features.clone())")
    return checked_fit(name, data, fitted)


def checked_fit(name: str, data: LabData, fitted) -> Fitted:
    """What every fit returns, checked: a Fitted holding a registered head kind with finite tensors that scores the
    cache's features (check_head), and a dict of what it chose. Sets `fitted.method`."""
    import dataclasses

    from ltcache.heads import HEAD_KINDS, Head

    if not isinstance(fitted, Fitted):
        raise LtcacheError(f"method {name} returned {type(fitted).__name__}, not ltcache.Fitted(head, chosen)")
    if not isinstance(fitted.head, Head) or not isinstance(fitted.chosen, dict):
        raise LtcacheError(f"method {name} returned Fitted({type(fitted.head).__name__}, "
                           f"{type(fitted.chosen).__name__}); it needs an ltcache.Head and a dict")
    kind = getattr(type(fitted.head), "kind", None)
    if not dataclasses.is_dataclass(fitted.head) or kind not in HEAD_KINDS or HEAD_KINDS[kind] is not type(fitted.head):
        raise LtcacheError(f"method {name} returned a {type(fitted.head).__name__}, which is not a registered head "
                           "kind; return an ltcache.LinearHead, or make the head a dataclass with @ltcache.head_kind")
    check_head(name, fitted.head, data)
    fitted.method = name
    return fitted


def shared_fingerprint(data: LabData) -> tuple:
    """What a plugin method must leave as it found it: each shared tensor's in-place version counter and two sums
    (the second weighted by row, so a permutation of rows shows too). It also catches writes through a NumPy view,
    which the version counter does not see."""
    import torch

    tensors = [data.joint.weight, data.joint.bias]
    for split in (data.train, data.val, data.train_views):
        if split is not None:
            tensors += [split.features, split.labels]
    if data.text is not None:
        tensors.append(data.text.weight)
    prints = []
    for tensor in tensors:
        if tensor is None:
            continue
        rows = tensor.reshape(len(tensor), -1).sum(1, dtype=torch.float64) if tensor.dim() else tensor.double()
        weights = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        prints.append((tensor._version, float(rows.sum()), float((rows.reshape(-1) * weights).sum())))
    return tuple(prints)


def check_head(name: str, head, data: LabData) -> None:
    """Every fitted head, built-in or plugin, before it is scored: finite tensors, the cache's class count, and
    logits of shape [rows, classes] on a few train rows (so a wrong feature size shows too). A NaN head scored as a
    row would be a quiet wrong number."""
    import torch

    classes, dim = len(data.class_counts), data.train.features.shape[1]
    for key, tensor in head.tensors().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LtcacheError(f"method {name} returned a head whose {key!r} holds NaN or infinite values; it "
                               "diverged or is broken (try a smaller lr)")
    try:
        count = head.num_classes
    except Exception as exc:  # noqa: BLE001 - a plugin head's property may fail any way
        raise LtcacheError(f"method {name} returned a head whose num_classes fails ({type(exc).__name__})") from None
    if count != classes:
        raise LtcacheError(f"method {name} returned a head of {count} classes for a cache of {classes}; a head "
                           "needs one output per class")
    rows = data.train.features[: min(8, len(data.train))]
    try:
        logits = head.logits(rows)
    except Exception as exc:  # noqa: BLE001 - a wrong shape fails inside torch with many messages
        raise LtcacheError(f"method {name} returned a head that cannot score {dim}-d features "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if tuple(logits.shape) != (len(rows), classes):
        raise LtcacheError(f"method {name} returned a head whose logits are {tuple(logits.shape)} for "
                           f"{len(rows)} rows of {classes} classes")
    if not bool(torch.isfinite(logits).all()):
        raise LtcacheError(f"method {name} returned a head whose logits are NaN or infinite")
