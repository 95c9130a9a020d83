"""Typed declarations: every option, recipe key, stage-2 hyperparameter and loss parameter is declared once here,
with its type, its range or choices, and a one-line help, and checked before anything is written or fitted.

The same `Param` serves every surface: the command line (typer options are generated from it), TOML recipes (values
must already have the declared type: the string "no" is not a bool, 1.5 is not an integer), `--set` and
`--loss-param` text (parsed strictly: "ture" is an error), and the Python API (`checked` validates keyword
arguments). Modelled on scikit-learn's `_parameter_constraints` and spaCy's typed config.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltcache.core.errors import LtcacheError

MAX_CLASSES = 1_000_000  # a label at or above this is damage (2**40 in a .cls file), not a class: checked before
# any array of per-class counts is allocated
MAX_GRID_POINTS = 10_000  # a grid of more points than this is a typo (0:1e9:1e-9), not an ablation
GRID = "grid"  # the type of a list of numbers, written 0,0.5,1 or start:stop:step
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               Path: "a path", dict: "a table of NAME = VALUE", list: "a list of strings",
               GRID: "a list of finite numbers"}


@dataclass(frozen=True)
class Param:
    """One declared value. `low`/`high` are inclusive bounds, `above`/`below` exclusive ones; `optional` allows
    None (a default decided elsewhere, e.g. the dataset's own); `choices` may be a callable (a registry)."""

    name: str
    type: Any
    default: Any = None
    help: str = ""
    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    optional: bool = False
    max_points: int = MAX_GRID_POINTS
    option: str | None = None  # the command-line flag when it is not --NAME-WITH-DASHES (e.g. --json)
    default_text: str | None = None  # what a None default resolves to, e.g. '0.2 x batch_size / 512'

    def shown_default(self) -> str | None:
        """The effective default as the listings show it: `default_text` for a default decided from other values."""
        return self.default_text if self.default is None and self.default_text else None

    @property
    def flag(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")

    def allowed_choices(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """What a valid value looks like, e.g. 'an integer >= 1' or 'one of: sgd, lbfgs'."""
        if self.choices is not None and not callable(self.choices):
            text = "one of: " + ", ".join(self.choices)
        else:
            text = _TYPE_NAMES.get(self.type, str(self.type))
            bounds = [f">= {_num(self.low)}" if self.low is not None else None,
                      f"> {_num(self.above)}" if self.above is not None else None,
                      f"<= {_num(self.high)}" if self.high is not None else None,
                      f"< {_num(self.below)}" if self.below is not None else None]
            bounds = [b for b in bounds if b]
            if bounds:
                text += (", each " if self.type == GRID else " ") + " and ".join(bounds)
            if self.type == GRID:
                text += f", at most {self.max_points:,} of them"
        return text + (" (or unset)" if self.optional and self.default is not None else "")

    def constrained(self) -> bool:
        return any(v is not None for v in (self.low, self.above, self.high, self.below, self.choices)) \
            or self.type == GRID

    def help_text(self) -> str:
        """The one-line help, with the range or choices where there are any, as --help shows it."""
        if not self.constrained() or (callable(self.choices) and self.low is None):
            return self.help
        return f"{self.help} [{self.describe()}]"

    # ------------------------------------------------------------------------------------------- checking

    def check(self, value: Any, label: str | None = None) -> Any:
        """`value` as the declared type and within range; a one-line LtcacheError naming `label` otherwise.
        No conversion between kinds: a string is never a number or a bool here (see `parse` for text)."""
        label = label or self.flag
        if value is None:
            if self.optional:
                return None
            raise self._error(label, value)
        if self.type == GRID:
            if isinstance(value, str):
                return self.parse(value, label)
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise self._error(label, value)
            try:
                numbers = [float(v) for v in value]
            except OverflowError:  # an integer too large for a float
                raise self._error(label, value) from None
            return self._check_grid(numbers, label)
        if self.type is bool:
            if not isinstance(value, bool):
                raise self._error(label, value)
        elif self.type is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise self._error(label, value)
        elif self.type is float:
            try:
                finite = _is_number(value) and math.isfinite(value)
            except OverflowError:  # an integer too large for a float (400 digits)
                finite = False
            if not finite:
                raise self._error(label, value)
            value = float(value)
        elif self.type is str or self.type is Path:
            if not isinstance(value, (str, Path)) or (self.type is str and not isinstance(value, str)):
                raise self._error(label, value)
        elif self.type is dict:
            if not isinstance(value, dict):
                raise self._error(label, value)
        elif self.type is list:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise self._error(label, value)
            value = list(value)
        if self.type in (int, float) and not self._in_range(value):
            raise self._error(label, value)
        choices = self.allowed_choices()
        if choices is not None and value not in choices:
            if callable(self.choices):  # a registry: "unknown dataset 'x'; choose one of: ..."
                from ltcache.core.errors import unknown_name

                raise unknown_name(label.lstrip("-").replace("-", " ") if label.startswith("--") else label, value,
                                   choices)
            raise LtcacheError(f"{label} must be one of: {', '.join(choices)}; got {value!r}")
        return value

    def parse(self, text: str, label: str | None = None) -> Any:
        """A value from command-line text, parsed strictly for the declared type, then checked."""
        label = label or self.flag
        if not isinstance(text, str):
            return self.check(text, label)
        stripped = text.strip()
        if self.optional and stripped.lower() in ("", "none", "null"):
            return None
        if self.type is bool:
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            raise self._error(label, text)
        if self.type in (int, float):  # int("1.5") and float("ten") fail, as they should
            try:
                value = self.type(stripped)
            except ValueError:
                raise self._error(label, text) from None
            return self.check(value, label)
        if self.type == GRID:
            return self._check_grid(parse_grid(stripped, label, max_points=self.max_points), label)
        return self.check(text if self.type is str else Path(text), label)

    def _in_range(self, value: float) -> bool:
        return not ((self.low is not None and value < self.low) or (self.above is not None and value <= self.above)
                    or (self.high is not None and value > self.high)
                    or (self.below is not None and value >= self.below))

    def _check_grid(self, values: list[float], label: str) -> tuple[float, ...]:
        if not values:
            raise LtcacheError(f"{label}: the grid is empty; give values such as 0,0.5,1 or a range like 0:2:0.1")
        if len(values) > self.max_points:
            raise LtcacheError(f"{label}: {len(values):,} grid points are more than {self.max_points:,}; use a "
                               "coarser step")
        bad = [v for v in values if not math.isfinite(v) or not self._in_range(v)]
        if bad:
            raise LtcacheError(f"{label} must be {self.describe()}; {_num(bad[0])} is not")
        return tuple(values)

    def _error(self, label: str, value: Any) -> LtcacheError:
        name = type(value).__name__
        kind = "a string" if isinstance(value, str) else ("unset" if value is None else
                                                          f"{'an' if name[0] in 'aeiou' else 'a'} {name}")
        shown = "nothing" if value is None else repr(value)
        if len(shown) > 60:  # a 400-digit number stays a short line
            shown = f"{shown[:28]}...{shown[-12:]} ({len(shown)} characters)"
        return LtcacheError(f"{label} must be {self.describe()}, got {shown} ({kind})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def parse_grid(text: str, label: str, *, max_points: int = MAX_GRID_POINTS) -> list[float]:
    """'0,0.1,0.5' or 'start:stop:step' (stop included). The size of a range is checked before it is built."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > max_points:
                raise LtcacheError(f"{label} {text!r} has {count:,} points, more than {max_points:,}; use a coarser "
                                   "step")
            return [round(start + i * step, 10) for i in range(max(count, 0))]
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise LtcacheError(f"{label} {text!r} is not a list like 0,0.1,0.5 or a range like 0:2:0.1 (finite numbers, "
                           "step > 0)") from None


# --------------------------------------------------------------------------------- declaring and checking


def declared(default: Any, help: str, **constraints) -> Any:
    """A dataclass field declared with its help and constraints (its type comes from the annotation)."""
    return dataclasses.field(default=default, metadata={"help": help, **constraints})


@functools.cache
def params_of(cls: type) -> dict[str, Param]:
    """The Params of a dataclass whose fields were made with `declared`, typed by their annotations."""
    hints = typing.get_type_hints(cls)
    params = {}
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue
        kind, optional = _unwrap(hints[field.name])
        params[field.name] = Param(field.name, kind, field.default, optional=optional, **field.metadata)
    return params


def _unwrap(annotation) -> tuple[Any, bool]:
    """int | None -> (int, True); tuple[float, ...] -> (GRID, False)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return GRID, optional
    if origin is dict or annotation is dict:
        return dict, optional
    return annotation, optional


def check_all(params: Iterable[Param], values: dict[str, Any]) -> dict[str, Any]:
    """Every declared value checked (unknown keys ignored); returns the values as checked."""
    checked_values = dict(values)
    for param in params:
        if param.name in values:
            checked_values[param.name] = param.check(values[param.name])
    return checked_values


def checked(*params: Param) -> Callable:
    """Decorator: check the declared keyword arguments of every call before the function does any work."""
    by_name = {p.name: p for p in params}

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            for name, value in bound.arguments.items():
                if name in by_name:
                    bound.arguments[name] = by_name[name].check(value)
            return fn(*bound.args, **bound.kwargs)

        call.params = by_name  # type: ignore[attr-defined]
        return call

    return wrap
