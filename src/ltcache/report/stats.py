"""The report's statistics, in one place: the 95% t-interval (over seeds, or over inputs that share a label), and
the aggregation of results.json rows by label, refusing to average inputs that are not seeds of one experiment."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.report.inputs import KEYS, Result


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its 95% Student-t interval over `values` (at least two; NaN propagates)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def mean_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95% t-interval (None for a single value)."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(values):
        return float("nan"), None
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    _, low, high = t_interval(values)
    return mean, (low, high)


def aggregate_rows(results: list[Result], *, label: str | None = None) -> dict[str, dict[str, dict]]:
    """{label: {method: {key: {mean, ci95, interval, n, values}, groups, seeds}}}: for each label (`label` puts every
    input under one), the mean of each metric over its inputs with a 95% t-interval over them (`interval` "seeds"),
    or for a single input its bootstrap interval from results.json (`interval` "bootstrap")."""
    grouped: dict[str, list[Result]] = {}
    for result in results:
        grouped.setdefault(label if label is not None else result.label, []).append(result)
    for name, members in grouped.items():
        check_replicates(name, members)
    table: dict[str, dict[str, dict]] = {}
    for name, members in grouped.items():
        methods: dict[str, list[tuple[Result, dict]]] = {}
        for result in members:
            for row in result.rows:
                methods.setdefault(row["method"], []).append((result, row))
        table[name] = {}
        for method, entries in methods.items():
            stats = {}
            for key in KEYS:
                values = [row.get(key) for _, row in entries]
                values = [float(v) for v in values if isinstance(v, (int, float))]
                mean, interval = mean_interval(values)
                kind = "seeds" if interval else None
                if interval is None and len(entries) == 1:
                    bootstrap = (entries[0][1].get("ci95") or {}).get(key)
                    if bootstrap and None not in bootstrap:
                        interval, kind = (float(bootstrap[0]), float(bootstrap[1])), "bootstrap"
                stats[key] = {"mean": mean, "ci95": list(interval) if interval else None, "interval": kind,
                              "n": len(values), "values": values}
            first = entries[0][1]
            stats["groups"] = {g: first.get(f"n_{g}") for g in ("many", "medium", "few")}
            stats["seeds"] = [result.seed for result, _ in entries]
            table[name][method] = stats
    return table


REPLICATE_FIELDS = ("dataset", "class_counts", "thresholds", "selected_on")


def _replicate_key(result: Result, field_name: str):
    if field_name == "dataset":
        return result.provenance.get("dataset") or (result.manifest.get("dataset") or {}).get("name")
    if field_name == "thresholds":
        return result.results.get("thresholds") or {"many": 100, "few": 20}
    return result.results.get(field_name)


def check_replicates(label: str, members: list[Result]) -> None:
    """Inputs averaged under one label are seeds of one experiment: they must share the dataset, the class counts,
    the shot thresholds and the selection split, or the mean (and its interval) mixes different things."""
    for field_name in REPLICATE_FIELDS:
        values = [_replicate_key(member, field_name) for member in members]
        if any(value != values[0] for value in values[1:]):
            other = next(m for m, v in zip(members, values, strict=True) if v != values[0])
            raise LtcacheError(f"inputs {members[0].path} and {other.path} share the label {label!r} but differ in "
                               f"{field_name}, so they cannot be averaged as seeds; pass --by with a field that "
                               "tells them apart (e.g. --by dataset.name)")


def shared_groups(table: dict[str, dict[str, dict]]) -> dict | None:
    """The Many / Medium / Few class counts when every entry has the same ones (else None: each row shows its own)."""
    sizes = {json.dumps(stats["groups"], sort_keys=True) for methods in table.values() for stats in methods.values()}
    return json.loads(sizes.pop()) if len(sizes) == 1 else None
