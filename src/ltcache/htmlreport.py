"""`ltcache report`: one self-contained HTML page, and merged results.md / results.csv, for one or many comparisons.

Each input is what `ltcache compare` wrote (a cache, or a compare --out folder, holding reports/results.json). Inputs
are labelled by a provenance field (`--by backbone.resolved_config.sampler`; found automatically when the inputs
differ in stage-1 sampler, loss, backbone, dataset or selection split), and inputs that share a label are replicate
seeds: the page shows their mean with a 95% t-interval. A single input shows its own bootstrap interval.

The page has no script and loads nothing: every figure is an inline PNG and a Content-Security-Policy forbids any
request, so it opens from disk anywhere. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltcache.errors import LtcacheError
from ltcache.folders import FolderKind, StagedFolder, write_marker

REPORT = FolderKind("report folder", "report.json", "index.html", ("report_version", "sources"),
                    self_hash="report_sha256")
REPORT_VERSION = 1
KEYS = ("many", "medium", "few", "all", "mean_per_class", "harmonic_mean", "geometric_mean", "top5", "ece")
HEADINGS = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All", "mean_per_class": "mean/class",
            "harmonic_mean": "HM", "geometric_mean": "GM", "top5": "top-5", "ece": "ECE"}
LOWER_IS_BETTER = {"ece"}
# Provenance fields that, when they differ between inputs, label them (the first that differ, joined).
AUTO_BY = ("backbone.resolved_config.sampler", "backbone.resolved_config.loss", "backbone.arch", "dataset.name",
           "selected_on")
MAX_PANELS = 6


@dataclass
class Result:
    """One comparison: the folder given, its results.json, the cache manifest when it can still be read, its label."""

    path: Path
    results: dict
    manifest: dict = field(default_factory=dict)
    label: str = ""

    @property
    def rows(self) -> list[dict]:
        return self.results["rows"]

    @property
    def provenance(self) -> dict:
        return self.results.get("provenance") or {}

    @property
    def seed(self):
        stage1 = self.provenance.get("stage1_seed")
        return stage1 if stage1 is not None else self.results.get("seed")

    def lookup(self, dotted: str):
        """A dotted field of results.json, or of the cache manifest (backbone.resolved_config.sampler, dataset.name)."""
        parts = dotted.split(".")
        if parts[:2] == ["backbone", "config"]:
            parts[1] = "resolved_config"
        for source in (self.results, self.manifest, {"provenance": self.provenance}):
            value, found = source, True
            for part in parts:
                if isinstance(value, dict) and part in value:
                    value = value[part]
                else:
                    found = False
                    break
            if found:
                return value
        known = sorted({*self.results, *self.manifest} - {"rows"})
        raise LtcacheError(f"--by {dotted}: {self.path} has no such field; fields start with one of "
                           f"{', '.join(known)} (e.g. backbone.resolved_config.sampler)")


def results_file(path: Path) -> Path:
    """The results.json of an input: a cache or compare --out folder, its reports/ folder, or the file itself."""
    path = Path(path)
    for candidate in (path / "reports" / "results.json", path / "results.json", path):
        if candidate.is_file() and candidate.name == "results.json":
            return candidate
    if not path.exists():
        raise LtcacheError(f"{path} does not exist; pass a cache (or compare --out folder) that ltcache compare wrote")
    raise LtcacheError(f"{path} has no reports/results.json; run ltcache compare {path} first")


def _read(path: Path) -> tuple[dict, dict]:
    """An input's results.json and its cache's manifest, read under a shared lock on the folder that holds
    reports/ (a cache or a compare --out folder): a compare publishing there at the same moment is waited for."""
    from ltcache.folders import folder_lock

    path = Path(path)
    root = path if path.is_dir() and path.name != "reports" else (path.parent if path.is_dir() else path.parent.parent)
    with folder_lock(root, shared=True, what="results folder"):
        file = results_file(path)
        results = read_results_json(file)
    manifest = {}
    from ltcache.results_folder import cache_of_results

    cache = cache_of_results(file)  # from the file's own place, never the current folder
    if cache is not None:
        try:
            manifest = json.loads((cache / "manifest.json").read_bytes().decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError
        except (OSError, ValueError):
            raise LtcacheError(f"the manifest of cache {cache} (behind {file}) is damaged; run ltcache info "
                               f"{cache} --verify") from None
        if manifest.get("generation") != results.get("cache_generation"):
            raise LtcacheError(f"{file} was computed on an earlier version of cache {cache} (it was extracted again "
                               f"since); re-run ltcache compare {cache}")
    return results, manifest


# ------------------------------------------------------------------------------------------- results.json


def read_results_json(file: Path) -> dict:
    """A results.json that ltcache compare wrote, validated as a whole: every field the report reads has its type
    and its length (per-class arrays, weight norms), or a one-line LtcacheError names the first that does not."""
    try:
        results = json.loads(Path(file).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise LtcacheError(f"{file} is not readable JSON ({type(exc).__name__}); re-run ltcache compare") from None
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not rows or not all(_is_row(row) for row in rows):
        raise LtcacheError(f"{file} is not an ltcache results.json (no rows with method, many, medium, few, all); "
                           "re-run ltcache compare")
    problem = results_problem(results)
    if problem is not None:
        raise LtcacheError(f"{file} is damaged: {problem}; re-run ltcache compare")
    return results


def _is_row(row) -> bool:
    """A results.json row: a method name and the four accuracies (null where a group has no class)."""
    return isinstance(row, dict) and isinstance(row.get("method"), str) and all(
        key in row and (row[key] is None or isinstance(row[key], (int, float)) and not isinstance(row[key], bool))
        for key in ("many", "medium", "few", "all"))


def _number(value, *, optional: bool = True) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and abs(value) < 1e300


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def results_problem(results: dict) -> str | None:
    """The first field of a results.json that is not what ltcache writes, or None."""
    for key in ("cache", "selected_on"):
        if key in results and not isinstance(results[key], str):
            return f"'{key}' must be a string"
    if "cache_generation" in results and not (results["cache_generation"] is None
                                              or isinstance(results["cache_generation"], str)):
        return "'cache_generation' must be a string"
    if "seed" in results and not _count(results["seed"]):
        return "'seed' must be a non-negative integer"
    thresholds = results.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, dict) and _count(thresholds.get("many"))
                                       and _count(thresholds.get("few"))):
        return "'thresholds' must hold integers 'many' and 'few'"
    counts = results.get("class_counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) >= 1 and all(map(_count, counts))):
        return "'class_counts' must be a list of non-negative integers"
    classes = len(counts) if isinstance(counts, list) else None
    for key in ("provenance", "groups"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            return f"'{key}' must be a JSON object"
    for index, row in enumerate(results["rows"]):
        where = f"rows[{index}] ({row['method']!r})"
        if not row["method"].strip():
            return f"rows[{index}]: 'method' is empty"
        for key in (*KEYS, "temperature"):
            if key in row and not _number(row[key]):
                return f"{where}: {key!r} must be a finite number or null"
        for key in ("n_many", "n_medium", "n_few"):
            if key in row and not _count(row[key]):
                return f"{where}: {key!r} must be a non-negative integer"
        ci = row.get("ci95")
        if ci is not None:
            if not isinstance(ci, dict) or not all(
                    isinstance(v, list) and len(v) == 2 and all(map(_number, v)) for v in ci.values()):
                return f"{where}: 'ci95' must map metrics to [low, high]"
        per_class = row.get("per_class")
        if per_class is not None:
            if not isinstance(per_class, list) or not all(map(_number, per_class)):
                return f"{where}: 'per_class' must be a list of numbers"
            if classes is not None and len(per_class) != classes:
                return f"{where}: 'per_class' has {len(per_class)} values for {classes} classes"
        bins = row.get("reliability")
        if bins is not None and not (isinstance(bins, list) and all(
                isinstance(b, dict) and _number(b.get("confidence"), optional=False)
                and _number(b.get("accuracy"), optional=False) for b in bins)):
            return f"{where}: 'reliability' must be a list of bins with a confidence and an accuracy"
        priors = row.get("shifted_priors")
        if priors is not None and not (isinstance(priors, dict) and all(
                isinstance(k, str) and _number(v, optional=False) for k, v in priors.items())):
            return f"{where}: 'shifted_priors' must map priors to numbers"
    norms = results.get("weight_norms")
    if norms is not None:
        if not isinstance(norms, dict):
            return "'weight_norms' must be a JSON object"
        for name, values in norms.items():
            if not isinstance(values, list) or not all(_number(v, optional=False) for v in values):
                return f"weight_norms[{name!r}] must be a list of numbers"
            if classes is not None and len(values) != classes:
                return f"weight_norms[{name!r}] has {len(values)} values for {classes} classes"
    curves = results.get("curves")
    if curves is not None:
        if not isinstance(curves, dict):
            return "'curves' must be a JSON object"
        for name, curve in curves.items():
            if not (isinstance(curve, dict) and isinstance(curve.get("param"), str) and isinstance(
                    curve.get("entries"), list) and _number(curve.get("chosen"))):
                return f"curves[{name!r}] must have a 'param', 'entries' and a numeric 'chosen'"
            param = curve["param"]
            for entry in curve["entries"]:
                if not (isinstance(entry, dict) and _number(entry.get(param), optional=False)
                        and all(_number(entry.get(key)) for key in ("many", "medium", "few", "all"))):
                    return f"curves[{name!r}]: every entry needs a number {param!r} and the four accuracies"
    return None


def load_results(paths: Iterable[Path | str], *, by: str | None = None,
                 labels: Sequence[str] | None = None) -> list[Result]:
    """Read every input's results.json (an error names the first that is missing, damaged or stale) and label it:
    with `labels` (one per input), else by the `by` fields (comma-separated dotted paths; an input that lacks one
    shows '-' there), else by the provenance fields in which the inputs differ, else by folder name."""
    paths = [Path(p) for p in paths]
    if labels is not None and len(labels) != len(paths):
        raise LtcacheError(f"{len(labels)} labels for {len(paths)} inputs; give one label per input")
    if not paths:
        raise LtcacheError("no inputs; pass one or more caches (or compare --out folders)")
    seen = {}
    for path in paths:
        key = results_file(path).resolve()
        if key in seen:
            raise LtcacheError(f"{path} is given twice (also as {seen[key]}); pass each input once")
        seen[key] = path
    loaded = [Result(path, *_read(path)) for path in paths]
    if labels is not None:
        for result, label in zip(loaded, labels, strict=True):
            result.label = str(label)
        return loaded
    fields = [f.strip() for f in by.split(",") if f.strip()] if by else _auto_by(loaded)
    values = {}
    for dotted in fields:
        found = []
        for result in loaded:
            try:
                found.append(_short(result.lookup(dotted)))
            except LtcacheError as exc:
                found.append(exc)
        if all(isinstance(v, LtcacheError) for v in found):
            raise found[0]  # no input has it: a misspelt field
        values[dotted] = ["-" if isinstance(v, LtcacheError) else v for v in found]
    for index, result in enumerate(loaded):
        result.label = (" / ".join(values[f][index] for f in fields) if fields else _folder_name(result.path))
    return loaded


def _auto_by(results: list[Result]) -> list[str]:
    if len(results) < 2:
        return []
    differing = []
    for dotted in AUTO_BY:
        try:
            values = {json.dumps(r.lookup(dotted), sort_keys=True, default=str) for r in results}
        except LtcacheError:
            continue
        if len(values) > 1:
            differing.append(dotted)
    return differing


def _folder_name(path: Path) -> str:
    path = Path(path).resolve()
    if path.name == "results.json":
        path = path.parent
    if path.name == "reports":
        path = path.parent
    return path.name


def _short(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ statistics


def mean_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95% t-interval (None for a single value)."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(values):
        return float("nan"), None
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, (mean - half, mean + half)


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


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def _cell(stat: dict) -> str:
    mean = stat["mean"]
    if mean != mean:
        return "-"
    if not stat["ci95"]:
        return f"{mean:.2f}"
    low, high = stat["ci95"]
    if stat["interval"] == "seeds":
        return f"{mean:.2f} ± {(high - low) / 2:.2f}"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def summary_table(table: dict[str, dict[str, dict]], *, label: str = "input", flat: bool = False,
                  extra: str | None = None) -> str:
    """A Markdown table of `aggregate_rows` output: mean ± half-width of the 95% t-interval over seeds (or the
    bootstrap interval in brackets for a single input), Many / Medium / Few headed by their class counts. `flat`:
    one label column (the inner keys); `extra`: a key of each entry shown as a last column."""
    entries = [(outer, inner, stats) for outer, methods in table.items() for inner, stats in methods.items()]
    if not entries:
        return ""
    groups = shared_groups(table) or {}
    keys = ("many", "medium", "few", "all", "mean_per_class", "harmonic_mean")
    heads = [f"{HEADINGS[k]} ({_classes(groups[k])})" if groups.get(k) is not None else HEADINGS[k] for k in keys]
    if not groups:
        extra_sizes = True
        heads.append("classes Many / Medium / Few")
    else:
        extra_sizes = False
    first = [label] if flat else [label, "method"]
    lines = ["| " + " | ".join([*first, *heads, "n", *([extra] if extra else [])]) + " |",
             "|" + "---|" * len(first) + "---:|" * (len(heads) + 1) + ("---|" if extra else "")]
    for outer, inner, stats in entries:
        cells = [inner] if flat else [outer, inner]
        cells += [_cell(stats[k]) for k in keys]
        if extra_sizes:
            cells.append(" / ".join(str(stats["groups"].get(g)) for g in ("many", "medium", "few")))
        cells.append(str(stats["all"]["n"]))
        if extra:
            cells.append(", ".join(_short(v) for v in stats.get(extra, [])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figures


def _png(fig) -> tuple[str, int, int]:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    width, height = (int(v) for v in fig.get_size_inches() * 100)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


def new_figure(figsize: tuple[float, float], rows: int = 1, columns: int = 1, **subplots):
    """(figure, axes) on a figure of its own Agg canvas: no pyplot, so no global backend switch (a notebook's
    backend stays what it was) and no figure left registered in pyplot to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, **subplots)


def _panels(count: int, width: float = 4.6, height: float = 3.4):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = new_figure((width * columns, height * rows), rows, columns, squeeze=False)
    flat = list(axes.flat)
    for extra in flat[count:]:
        extra.set_visible(False)
    return fig, flat[:count]


def _finish(ax, title: str, xlabel: str, ylabel: str, *, grid: bool = True, legend_from: int = 1) -> None:
    """A panel's labels, title, grid, and a legend once it has `legend_from` lines or more."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if grid:
        ax.grid(alpha=0.3)
    if len(ax.lines) >= legend_from:
        ax.legend(fontsize=7)


def _by_label(results: list[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for result in results:
        grouped.setdefault(result.label, []).append(result)
    return dict(list(grouped.items())[:MAX_PANELS])


def figure_groups(table: dict[str, dict[str, dict]]):
    """Figure 1 style: Many / Medium / Few / All against the label (e.g. the stage-1 sampler), a line per method,
    95% intervals as error bars."""
    labels = list(table)
    methods = list(dict.fromkeys(m for methods in table.values() for m in methods))
    fig, axes = _panels(4, 4.2, 3.4)
    x = np.arange(len(labels))
    for ax, key in zip(axes, ("many", "medium", "few", "all"), strict=True):
        for offset, method in enumerate(methods):
            means, low, high = [], [], []
            for label in labels:
                stat = table[label].get(method, {}).get(key)
                mean = stat["mean"] if stat else float("nan")
                ci = stat["ci95"] if stat and stat["ci95"] else (mean, mean)
                means.append(mean)
                low.append(mean - ci[0])
                high.append(ci[1] - mean)
            shift = (offset - (len(methods) - 1) / 2) * 0.06
            ax.errorbar(x + shift, means, yerr=[low, high], marker="o", markersize=4, capsize=2, label=method)
        ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.set_title(HEADINGS[key])
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def figure_per_class(results: list[Result]):
    """Per-class test accuracy against the class's train count (log x), a series per method, a panel per label."""
    grouped = _by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        counts = np.asarray(members[0].results.get("class_counts") or [], dtype=np.float64)
        for method in dict.fromkeys(row["method"] for row in members[0].rows):
            series = [row.get("per_class") for result in members for row in result.rows
                      if row["method"] == method and row.get("per_class")]
            if not series or not len(counts):
                continue
            values = np.nanmean(np.array([[np.nan if v is None else v for v in s] for s in series], dtype=float), 0)
            order = np.argsort(counts)
            ax.plot(counts[order], values[order], marker="o", markersize=3, linewidth=1, label=method)
        ax.set_xscale("log")
        _finish(ax, label, "train images of the class (log)", "test accuracy of the class (%)")
    return fig


def figure_weight_norms(results: list[Result]):
    """Fig. 2 (left): per-class weight norms, classes sorted by train count, a panel per label (its first input)."""
    grouped = _by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        result = members[0]
        counts = np.asarray(result.results.get("class_counts") or [], dtype=np.float64)
        order = np.argsort(-counts, kind="stable")
        for method, norms in (result.results.get("weight_norms") or {}).items():
            ax.plot(np.asarray(norms)[order], marker="o", markersize=3, linewidth=1, label=method)
        _finish(ax, label, "classes by train count (descending)", "||w_j||")
    return fig


def figure_curves(results: list[Result], name: str):
    """A selection curve (Fig. 2 right for tau): accuracy per group on the selection split, a panel per label."""
    grouped = {label: members for label, members in _by_label(results).items()
               if name in (members[0].results.get("curves") or {})}
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        curve = members[0].results["curves"][name]
        values = [entry[curve["param"]] for entry in curve["entries"]]
        for key in ("many", "medium", "few", "all"):
            ax.plot(values, [entry[key] for entry in curve["entries"]], marker="o", markersize=3, label=HEADINGS[key])
        if curve.get("chosen") is not None:
            ax.axvline(curve["chosen"], color="black", linestyle="--", linewidth=1,
                       label=f"chosen {curve['param']} = {curve['chosen']:g}")
        _finish(ax, label, curve["param"], f"accuracy on {members[0].results.get('selected_on')} (%)")
    return fig


def figure_reliability(results: list[Result]):
    """Reliability diagrams: accuracy against confidence, a line per method, a panel per label (its first input)."""
    grouped = _by_label(results)
    fig, axes = _panels(len(grouped), 4.2, 4.0)
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for row in members[0].rows:
            bins = row.get("reliability") or []
            if bins:
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                        linewidth=1, label=f"{row['method']} (ECE {_float(row.get('ece')):.1f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _finish(ax, label, "confidence", "accuracy", grid=False, legend_from=2)  # the diagonal is not a method
    return fig


def _float(value) -> float:
    """A number of results.json as a float (null, written for NaN, reads back as NaN)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _prior_axis(keys: Iterable[str]) -> list[tuple[str, float]]:
    """Shifted-prior keys on one axis: backward_F at -log10(F), uniform at 0, forward_F at +log10(F)."""
    placed = []
    for key in keys:
        direction, _, factor = key.partition("_")
        try:
            value = math.log10(float(factor))
        except ValueError:
            continue
        placed.append((key, -value if direction == "backward" else value))
    return sorted(placed, key=lambda item: item[1])


def figure_shifted_priors(results: list[Result]):
    """Test accuracy if the test classes followed a long-tailed prior, forward (train order) or backward, against
    the prior's imbalance; a line per method, a panel per label (mean over its inputs)."""
    grouped = _by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        for method in dict.fromkeys(row["method"] for row in members[0].rows):
            rows = [row for result in members for row in result.rows if row["method"] == method]
            axis = _prior_axis(rows[0].get("shifted_priors") or {})
            if not axis:
                continue
            values = [float(np.mean([row["shifted_priors"][key] for row in rows])) for key, _ in axis]
            ax.plot([x for _, x in axis], values, marker="o", markersize=3, linewidth=1, label=method)
        ticks = _prior_axis(members[0].rows[0].get("shifted_priors") or {})
        ax.set_xticks([x for _, x in ticks], [key.replace("ward_", " ") for key, _ in ticks], rotation=45, fontsize=7)
        _finish(ax, label, "test prior: backward ← uniform → forward (imbalance)", "test accuracy (%)")
    return fig


def plot_sampling_weights(path: Path, class_counts, *, epochs: int) -> dict:
    """Figure 3: each sampler's class probabilities p_j (classes by decreasing n_j), and progressive sampling's at
    several epochs, from the samplers' own functions. Writes the PNG; returns the values drawn."""
    from ltcache.fsutil import atomic_write
    from ltcache.sampling import SAMPLERS

    counts = sorted((int(n) for n in class_counts), reverse=True)
    fig, (left, right) = new_figure((11, 4), 1, 2)
    values = {}
    for name in ("instance", "class", "sqrt"):
        values[name] = [float(v) for v in SAMPLERS[name](counts, 0, epochs)]
        left.plot(values[name], marker="o", markersize=3, label=name)
    for epoch in sorted({0, epochs // 4, epochs // 2, 3 * epochs // 4, epochs - 1}):
        column = f"progressive epoch {epoch + 1}/{epochs}"
        values[column] = [float(v) for v in SAMPLERS["progressive"](counts, epoch, epochs)]
        right.plot(values[column], marker="o", markersize=3, label=f"epoch {epoch + 1}")
    for ax, title in ((left, "instance-, class-balanced and square-root"), (right, "progressively balanced")):
        ax.set_xlabel("classes by decreasing n_j")
        ax.set_ylabel("p_j")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return {"columns": list(values), "values": values}


# ------------------------------------------------------------------------------------------------ the page

def _best(table: dict[str, dict[str, dict]], key: str) -> float | None:
    means = [stats[key]["mean"] for methods in table.values() for stats in methods.values()
             if stats[key]["mean"] == stats[key]["mean"]]
    if not means:
        return None
    return min(means) if key in LOWER_IS_BETTER else max(means)


def shared_groups(table: dict[str, dict[str, dict]]) -> dict | None:
    """The Many / Medium / Few class counts when every entry has the same ones (else None: each row shows its own)."""
    sizes = {json.dumps(stats["groups"], sort_keys=True) for methods in table.values() for stats in methods.values()}
    return json.loads(sizes.pop()) if len(sizes) == 1 else None


def _table_context(table: dict[str, dict[str, dict]]) -> dict:
    """The results table as plain values for the template (escaped there, whatever their type)."""
    keys = KEYS
    groups = shared_groups(table) or {}
    heads = [HEADINGS[k] + (f" ({_classes(groups[k])})" if groups.get(k) is not None else "") for k in keys]
    best = {key: _best(table, key) for key in keys}
    rows = []
    for label, methods in table.items():
        for method, stats in methods.items():
            cells = []
            for key in keys:
                stat = stats[key]
                mean = stat["mean"]
                marked = best[key] is not None and mean == mean and round(mean, 2) == round(best[key], 2)
                ci = ""
                if stat["ci95"]:
                    low, high = stat["ci95"]
                    ci = (f"± {(high - low) / 2:.2f}" if stat["interval"] == "seeds" else f"[{low:.2f}, {high:.2f}]")
                cells.append({"key": key, "value": "-" if mean != mean else f"{mean:.2f}", "ci": ci, "best": marked})
            rows.append({"label": label, "method": method, "cells": cells, "n": stats["all"]["n"],
                         "sizes": " / ".join(str(stats["groups"].get(g)) for g in ("many", "medium", "few"))})
    return {"heads": heads, "rows": rows, "own_sizes": not groups}


PROVENANCE_FIELDS = ("dataset", "class_counts", "backbone", "checkpoint_sha256", "checkpoint_format",
                     "stage1_sampler", "stage1_seed", "stage1_epochs", "cache_ltcache_version", "ltcache_version",
                     "train_command", "extract_command", "compare_command")


def _provenance_context(results: list[Result]) -> dict:
    heads = [f.replace("_", " ") for f in ("input", "label", "selected on", *PROVENANCE_FIELDS)]
    rows = []
    for result in results:
        prov = result.provenance
        cells = [{"text": str(result.path), "code": False}, {"text": result.label, "code": False},
                 {"text": str(result.results.get("selected_on")), "code": False}]
        for key in PROVENANCE_FIELDS:
            value = prov.get(key)
            if key == "class_counts" and value is None:
                value = result.results.get("class_counts")
            text = "-" if value is None else (", ".join(map(str, value)) if isinstance(value, list) else str(value))
            cells.append({"text": text, "code": key.endswith(("command", "sha256"))})
        rows.append(cells)
    return {"heads": heads, "rows": rows}


def _template():
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("ltcache", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.get_template("report.html.j2")


def plain_text_figures():
    """Figures whose labels are shown as written: matplotlib would read `$...$` in a method, class or folder name
    as mathtext (and fail on `m$\\foo$x`); ltcache's own labels use none."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def render_page(results: list[Result], *, title: str | None = None) -> str:
    """The self-contained HTML page for `results` (labelled already), rendered by templates/report.html.j2 with
    autoescaping: every value is escaped, whatever its type."""
    table = aggregate_rows(results)
    figures = []
    with plain_text_figures():
        if len(table) > 1:
            figures.append(("groups", figure_groups(table), "Many / Medium / Few / All test accuracy for each input "
                            "label (Figure 1 style), a line per classifier; bars are 95% intervals (t over seeds when "
                            "a label has several inputs, else the test bootstrap)."))
        figures.append(("per-class", figure_per_class(results), "Per-class test accuracy against the class's number "
                        "of train images (log scale), a series per method (mean over a label's inputs)."))
        if any(r.results.get("weight_norms") for r in results):
            figures.append(("weight-norms", figure_weight_norms(results), "Classifier weight norms ||w_j|| with "
                            "classes sorted by train count (paper Fig. 2, left), for the methods that define "
                            "per-class weights."))
        curve_names = list(dict.fromkeys(n for r in results for n in (r.results.get("curves") or {})))
        for name in curve_names:
            figures.append((f"curve-{name}", figure_curves(results, name), f"Selection curve {name}: accuracy per "
                            "group on the selection split against the hyperparameter (paper Fig. 2, right); the "
                            "dashed line is the chosen value."))
        figures.append(("reliability", figure_reliability(results), "Reliability diagrams: test accuracy against "
                        "confidence per bin; the diagonal is perfect calibration."))
        if any(row.get("shifted_priors") for r in results for row in r.rows):
            figures.append(("shifted-priors", figure_shifted_priors(results), "Test accuracy if the test classes "
                            "followed a long-tailed prior: forward keeps the train order, backward reverses it, at "
                            "each imbalance factor."))
        rendered = []
        for name, fig, caption in figures:
            data, width, height = _png(fig)
            rendered.append({"name": name, "caption": caption, "data": data, "width": width, "height": height})
    groups = shared_groups(table)
    sizes = (f"({groups['many']} / {groups['medium']} / {groups['few']} classes)" if groups else
             "(the class counts of each input in the table's last column)")
    selected = sorted({str(r.results.get("selected_on")) for r in results})
    thresholds = {json.dumps(r.results.get("thresholds") or {"many": 100, "few": 20}, sort_keys=True) for r in results}
    many, few = ("/".join(str(json.loads(t)[key]) for t in sorted(thresholds)) for key in ("many", "few"))
    title = title or ("ltcache report: " + ", ".join(dict.fromkeys(r.label for r in results)))
    return _template().render(
        title=title, inputs=len(results), groups=len(table), selected=", ".join(selected), many=many, few=few,
        sizes=sizes, table=_table_context(table), figures=rendered, provenance=_provenance_context(results),
        written=time.strftime("%Y-%m-%d %H:%M:%S"))


def csv_text(results: list[Result]) -> str:
    """One line per (input, method): every metric, the bootstrap interval of All, the input's label, seed, path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    sizes = ("n_many", "n_medium", "n_few")
    writer.writerow(["label", "seed", "input", "method", *KEYS, "all_ci95_low", "all_ci95_high", "selected_on",
                     *sizes])
    for result in results:
        for row in result.rows:
            ci = (row.get("ci95") or {}).get("all") or ["", ""]
            writer.writerow([result.label, result.seed, str(result.path), row["method"],
                             *("" if not isinstance(row.get(k), (int, float)) else round(row[k], 4) for k in KEYS),
                             *ci, result.results.get("selected_on"), *(row.get(size) for size in sizes)])
    return buffer.getvalue()


def build_report(inputs: Iterable[Path | str], out: Path | str, *, by: str | None = None, title: str | None = None,
                 overwrite: bool = False, labels: Sequence[str] | None = None) -> dict[str, str]:
    """`ltcache report`: read every input's results.json, label it (`labels`, one per input, or see `load_results`),
    write OUT/index.html (self-contained), results.md and
    results.csv (merged over inputs) and report.json (what was read). OUT is built beside its place and moved in
    whole; with `overwrite` it replaces an earlier report folder, and nothing else, once the new one is complete."""
    from ltcache.fsutil import atomic_write

    inputs = [Path(p) for p in inputs]
    results = load_results(inputs, by=by, labels=labels)
    target = Path(out).resolve()
    for result in results:
        folder = results_file(result.path).resolve().parent
        folder = folder.parent if folder.name == "reports" else folder
        if target == folder or folder in target.parents:
            raise LtcacheError(f"--out {out} lies inside the input {result.path}; pass a folder outside the caches "
                               "and compare folders it reads")
    staged = StagedFolder(Path(out), kind=REPORT, overwrite=overwrite, inputs=inputs)
    try:
        page = render_page(results, title=title)
        table = aggregate_rows(results)
        markdown = (f"# {title or 'ltcache report'}\n\nInputs: " + ", ".join(f"`{r.path}`" for r in results)
                    + "\n\n" + summary_table(table, label="input") + "\n")
        atomic_write(staged.path / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
        atomic_write(staged.path / "results.md", lambda tmp: tmp.write_text(markdown))
        atomic_write(staged.path / "results.csv", lambda tmp: tmp.write_text(csv_text(results)))
        write_marker(staged.path, REPORT, {
            "report_version": REPORT_VERSION, "by": by, "title": title,
            "sources": [{"input": str(r.path), "results": str(results_file(r.path).resolve()), "label": r.label,
                         "cache_generation": r.results.get("cache_generation")} for r in results],
            "table": table})
        folder = staged.publish()
    except BaseException:
        staged.abort()
        raise
    finally:
        staged.close()
    return {name: str(folder / name) for name in ("index.html", "results.md", "results.csv", "report.json")}


__all__ = ["Result", "aggregate_rows", "build_report", "load_results", "mean_interval", "plot_sampling_weights",
           "render_page", "summary_table"]
