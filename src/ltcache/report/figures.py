"""Every figure ltcache draws, drawn once: the compare folder's PNGs and the report page's inline figures come from
`page_figures` (which figures a set of results gets, each with its caption) and the figure functions below. Each
figure has its own Agg canvas (new_figure): no pyplot, so a notebook's matplotlib backend is never switched.

Legibility rules, checked by the browser test: a one-panel figure is drawn at about 7.2 x 4.6 inches (shown at 600
pixels or more in the page's two-column grid), a figure of several panels spans the page, legends sit outside the
data (to the right of one panel, beneath several), and no legend text is under 9 points. Seeds are never an axis:
inputs that share a label are averaged, and a panel with nothing to draw is left out with a sentence saying why."""

from __future__ import annotations

import base64
import io
import math
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltcache.core.fsutil import atomic_write
from ltcache.report.inputs import HEADINGS, MAX_PANELS, Result, _short

PANEL = (7.2, 4.6)  # inches of a one-panel figure (100 dpi: 720 x 460 pixels)
SMALL_PANEL = (4.8, 3.7)  # each panel of a figure of several
LEGEND_POINTS = 9
NAMED_CLASSES = 30  # class names on an axis up to this many classes
HEATMAP_CLASSES = 50  # a confusion heatmap up to this many classes (metrics.confusion stores the matrix)


@dataclass
class Drawn:
    """A figure of the report: its file stem, the matplotlib figure, the caption, whether it spans the page, and
    sentences on what was left out of it (a panel with nothing to draw). `png()` renders it once: compare's PNG
    file and the page's inline image are the same bytes."""

    name: str
    figure: object
    caption: str
    wide: bool = False
    notes: list[str] = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)

    def png(self) -> bytes:
        if self._png is None:
            self._png = png_bytes(self.figure)
        return self._png


DPI = 100


def png_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (constrained layout keeps legends placed outside the axes inside the canvas)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def encode_png(data: bytes) -> tuple[str, int, int]:
    """PNG bytes as base64 and their pixel size (read from the PNG's IHDR chunk)."""
    width, height = struct.unpack(">II", data[16:24])
    return base64.b64encode(data).decode("ascii"), int(width), int(height)


def new_figure(figsize: tuple[float, float], rows: int = 1, columns: int = 1, **subplots):
    """(figure, axes) on a figure of its own Agg canvas: no pyplot, so no global backend switch (a notebook's
    backend stays what it was) and no figure left registered in pyplot to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    if rows == 0:
        return fig, None
    return fig, fig.subplots(rows, columns, **subplots)


def _panels(count: int, size: tuple[float, float] | None = None, columns: int = 3):
    """A figure of `count` panels: one at PANEL size, several SMALL_PANEL each, `columns` to a row."""
    if count == 1:
        fig, ax = new_figure(size or PANEL)
        return fig, [ax]
    columns = _columns(count, columns)
    rows = math.ceil(count / columns)
    width, height = size or SMALL_PANEL
    fig, axes = new_figure((width * columns, height * rows), rows, columns, squeeze=False)
    flat = list(axes.flat)
    for extra in flat[count:]:
        extra.set_visible(False)
    return fig, flat[:count]


def _columns(count: int, most: int = 3) -> int:
    """Panels to a row: up to `most`, and four as two by two rather than three and a lone one."""
    return 2 if count == 4 and most == 3 else min(count, most)


def _legend(fig, axes: list, *, title: str | None = None) -> None:
    """One legend outside the data: right of a single panel, beneath a figure of several (entries of every panel)."""
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles and not label.startswith("_"):
                handles[label] = handle
                labels.append(label)
    if not labels:
        return
    if len(axes) == 1:
        fig.legend([handles[k] for k in labels], labels, loc="outside right upper", fontsize=LEGEND_POINTS,
                   title=title, title_fontsize=LEGEND_POINTS)
    else:
        fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=min(len(labels), 6),
                   fontsize=LEGEND_POINTS, title=title, title_fontsize=LEGEND_POINTS)


def _log_scale(axis) -> None:
    """A log axis whose tick labels are plain numbers (1, 10, 100): matplotlib's default writes them as mathtext,
    which plain_text_figures turns off."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _finish(ax, title: str, xlabel: str, ylabel: str, *, grid: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if grid:
        ax.grid(alpha=0.3)


def by_label(results: list[Result]) -> dict[str, list[Result]]:
    """Inputs grouped by label (replicate seeds of one experiment share a label), at most MAX_PANELS labels."""
    grouped: dict[str, list[Result]] = {}
    for result in results:
        grouped.setdefault(result.label, []).append(result)
    return dict(list(grouped.items())[:MAX_PANELS])


def class_names(result: Result) -> list[str]:
    """The cache's class names (from results.json's provenance, else the manifest), else the class indices."""
    counts = result.results.get("class_counts") or []
    for names in (result.provenance.get("class_names"), result.manifest.get("class_names")):
        if isinstance(names, list) and len(names) == len(counts) and all(isinstance(n, str) for n in names):
            return list(names)
    return [str(index) for index in range(len(counts))]


def mean_series(members: list[Result], method: str, key: str) -> np.ndarray | None:
    """A per-class array of a method (per_class, per_class_f1, ...), averaged over a label's inputs; None if absent."""
    series = [row.get(key) for result in members for row in result.rows if row["method"] == method and row.get(key)]
    if not series:
        return None
    return quiet_nanmean(np.array([[np.nan if v is None else v for v in s] for s in series], dtype=float), 0)


def quiet_nanmean(values: np.ndarray, axis: int | None = None):
    """np.nanmean, NaN (without numpy's warning) where every value is NaN: a class no input has a number for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis)


def _class_axis(ax, names: list[str], order: np.ndarray) -> None:
    """Class names as the x tick labels (rotated) where they fit, else the classes' ranks."""
    if len(order) <= NAMED_CLASSES:
        ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=60, ha="right",
                      rotation_mode="anchor", fontsize=8)


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method on the whole page, in the order methods first appear (a method is the same colour in
    every figure)."""
    return {method: f"C{index % 10}" for index, method in enumerate(dict.fromkeys(methods))}


def _methods(members: list[Result]) -> list[str]:
    return list(dict.fromkeys(row["method"] for result in members for row in result.rows))


# ------------------------------------------------------------------------------------------------- the figures


def figure_groups(table: dict[str, dict[str, dict]]):
    """Figure 1 style: Many / Medium / Few / All against the label (e.g. the stage-1 sampler), a line per method,
    95% intervals as error bars."""
    labels = list(table)
    methods = list(dict.fromkeys(m for methods in table.values() for m in methods))
    colors = method_colors(methods)
    fig, axes = _panels(4, (4.4, 3.6), columns=4)
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
            ax.errorbar(x + shift, means, yerr=[low, high], marker="o", markersize=4, capsize=2, label=method,
                        color=colors[method])
        ax.set_xticks(x, labels, rotation=25, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(HEADINGS[key])
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


def figure_per_class(results: list[Result]):
    """Per-class test accuracy, a series per method (mean over a label's inputs), a panel per label: classes by
    train count with their names where they fit, else against the train count on a log axis."""
    colors = method_colors(_methods(results))
    grouped = by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        counts = np.asarray(members[0].results.get("class_counts") or [], dtype=np.float64)
        names = class_names(members[0])
        order = np.argsort(-counts, kind="stable")
        named = len(counts) <= NAMED_CLASSES
        for method in _methods(members):
            values = mean_series(members, method, "per_class")
            if values is None or not len(counts):
                continue
            x = np.arange(len(order)) if named else counts[order]
            ax.plot(x, values[order], marker="o", markersize=3, linewidth=1, label=method, color=colors[method])
        if named:
            _class_axis(ax, names, order)
            _finish(ax, label, "classes by train images (most first)", "test accuracy of the class (%)")
        else:
            ax.set_xscale("log")
            _log_scale(ax.xaxis)
            ax.invert_xaxis()
            _finish(ax, label, "train images of the class (log, most first)", "test accuracy of the class (%)")
    _legend(fig, axes)
    return fig


def figure_weight_norms(results: list[Result], notes: list[str] | None = None):
    """Fig. 2 (left): per-class weight norms, classes sorted by train count (their counts as grey bars behind), a
    panel per label (its first input). A label none of whose methods has weight norms is left out (in `notes`);
    None when no label has any."""
    colors = method_colors(_methods(results))
    grouped = {label: members for label, members in by_label(results).items()
               if members[0].results.get("weight_norms")}
    left_out = [label for label in by_label(results) if label not in grouped]
    if notes is not None and left_out and grouped:
        notes.append(f"Left out: {', '.join(left_out)}, where no method with per-class weights (Joint, cRT, "
                     "τ-normalized, LWS, ...) was run.")
    if not grouped:
        return None
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        result = members[0]
        counts = np.asarray(result.results.get("class_counts") or [], dtype=np.float64)
        order = np.argsort(-counts, kind="stable")
        for method, norms in result.results["weight_norms"].items():
            ax.plot(np.asarray(norms)[order], marker="o", markersize=3, linewidth=1, label=method,
                    color=colors.get(method))
        if len(counts):
            behind = ax.twinx()
            behind.bar(range(len(order)), counts[order], color="grey", alpha=0.2)
            behind.set_ylabel("train images")
            ax.set_zorder(behind.get_zorder() + 1)
            ax.patch.set_visible(False)
        _class_axis(ax, class_names(result), order)
        _finish(ax, label, "classes by train images (most first)", "classifier weight norm ||w_j||")
    _legend(fig, axes)
    return fig


def figure_curves(results: list[Result], name: str):
    """A selection curve (Fig. 2 right for tau): accuracy per group on the selection split, a panel per label, the
    chosen value as a dashed line where the method chose one."""
    grouped = {label: members for label, members in by_label(results).items()
               if name in (members[0].results.get("curves") or {})}
    if not grouped:
        return None
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        curve = members[0].results["curves"][name]
        values = [entry[curve["param"]] for entry in curve["entries"]]
        for key in ("many", "medium", "few", "all"):
            ax.plot(values, [entry[key] for entry in curve["entries"]], marker="o", markersize=3, label=HEADINGS[key])
        if curve.get("chosen") is not None:
            ax.axvline(curve["chosen"], color="black", linestyle="--", linewidth=1, label="chosen")
            label = f"{label}: chosen {curve['param']} = {curve['chosen']:g}"
        _finish(ax, label, curve["param"], f"accuracy on {members[0].results.get('selected_on')} (%)")
    _legend(fig, axes)
    return fig


def figure_reliability(results: list[Result]):
    """Reliability diagrams, a panel per label (its first input): accuracy against confidence per bin, a line per
    method with markers sized by the bin's test rows, and the bin counts as a histogram beneath."""
    colors = method_colors(_methods(results))
    grouped = by_label(results)
    columns = _columns(len(grouped))
    rows = math.ceil(len(grouped) / columns)
    width, height = (PANEL[0], 5.4) if len(grouped) == 1 else (SMALL_PANEL[0], 4.6)
    fig, _ = new_figure((width * columns, height * rows), rows=0)
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3, 1] * rows)
    tops = []
    for index, (label, members) in enumerate(grouped.items()):
        row, column = divmod(index, columns)
        ax = fig.add_subplot(grid[2 * row, column])
        below = fig.add_subplot(grid[2 * row + 1, column], sharex=ax)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="_diagonal")
        biggest = max((b.get("count", 1) for r in members[0].rows for b in (r.get("reliability") or [])), default=1)
        eces: list[str] = []
        for result_row in members[0].rows:
            bins = result_row.get("reliability") or []
            if not bins:
                continue
            color = colors.get(result_row["method"])
            confidence = [b["confidence"] for b in bins]
            sizes = [8 + 120 * math.sqrt(b.get("count", biggest) / biggest) for b in bins]
            ax.plot(confidence, [b["accuracy"] for b in bins], color=color, linewidth=1,
                    label=result_row["method"])
            eces.append(f"{result_row['method']} ECE {_float(result_row.get('ece')):.1f}")
            ax.scatter(confidence, [b["accuracy"] for b in bins], s=sizes, color=color, alpha=0.6, label="_bins")
            if all("count" in b for b in bins):
                below.plot(confidence, [b["count"] for b in bins], color=color, marker=".", linewidth=1,
                           drawstyle="steps-mid")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelbottom=False)
        title = "\n".join([label, *(" · ".join(eces[i:i + 3]) for i in range(0, len(eces), 3))])
        _finish(ax, title, "", "accuracy", grid=False)
        below.set_yscale("log")
        _log_scale(below.yaxis)
        _finish(below, "", "confidence (bins of 1/15)", "test rows", grid=True)
        tops.append(ax)
    _legend(fig, tops)
    return fig


def figure_confusion(result: Result, method: str, members: list[Result] | None = None):
    """The confusion matrix of `method` as a heatmap (row-normalized: the share of each true class's test rows,
    summed over a label's inputs), counts written in the cells when the classes are few; None above
    HEATMAP_CLASSES classes or when results.json has no matrix."""
    matrices = [row.get("confusion") for member in (members or [result]) for row in member.rows
                if row["method"] == method and row.get("confusion")]
    if not matrices:
        return None
    counts = np.sum([np.asarray(m, dtype=np.float64) for m in matrices], axis=0)
    if len(counts) > HEATMAP_CLASSES:
        return None
    names = class_names(result)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = 100.0 * counts / counts.sum(1, keepdims=True)
    side = min(9.0, 3.0 + 0.3 * len(counts))
    fig, ax = new_figure((side + 1.6, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="share of the true class's test rows (%)", shrink=0.8)
    ticks = range(len(counts))
    ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    if len(counts) <= 15:
        for i in ticks:
            for j in ticks:
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 60 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result.label}: {method}", fontsize=10)
    return fig


def figure_grid(points: list[dict], method: str, selected_on: str):
    """One method's grid: for one varying hyperparameter, the selection and test mean per-class accuracy against
    it; for two, heatmaps of both side by side with the chosen point boxed; None for more (the table shows them)."""
    keys = list(dict.fromkeys(k for point in points for k in point["params"]))
    tested = any(point.get("test") for point in points)
    if len(keys) == 1:
        key = keys[0]
        ordered = sorted(points, key=lambda p: _sort_key(p["params"][key]))
        x = [p["params"][key] for p in ordered]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
        fig, ax = new_figure(PANEL)
        position = x if numeric else list(range(len(x)))
        ax.plot(position, [_float(p["selection_mean_per_class"]) for p in ordered], marker="o",
                label=f"{selected_on} (selection)")
        if tested:
            ax.plot(position, [_float((p.get("test") or {}).get("mean_per_class")) for p in ordered], marker="s",
                    label="test (after the choice)")
        chosen = next((position[i] for i, p in enumerate(ordered) if p["selected"]), None)
        if chosen is not None:
            ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label="chosen")
        if numeric and min(x) > 0 and max(x) / min(x) >= 20:
            ax.set_xscale("log")
            _log_scale(ax.xaxis)
        if not numeric:
            ax.set_xticks(position, [str(v) for v in x])
        _finish(ax, f"{method}: grid over {key}", key, "mean per-class accuracy (%)")
        _legend(fig, [ax])
        return fig
    if len(keys) != 2:
        return None
    rows_key, columns_key = keys
    row_values = sorted({p["params"][rows_key] for p in points}, key=_sort_key)
    column_values = sorted({p["params"][columns_key] for p in points}, key=_sort_key)
    panels = [("selection_mean_per_class", f"{selected_on} mean/class (selection)")]
    if tested:
        panels.append(("test", "test mean/class (after the choice)"))
    fig, axes = new_figure((5.2 * len(panels) + 0.8, 0.9 + 0.55 * max(len(row_values), 4)), 1, len(panels),
                           squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        grid = np.full((len(row_values), len(column_values)), np.nan)
        chosen = None
        for point in points:
            i, j = row_values.index(point["params"][rows_key]), column_values.index(point["params"][columns_key])
            value = (point.get("test") or {}).get("mean_per_class") if key == "test" else point[key]
            grid[i, j] = _float(value)
            if point["selected"]:
                chosen = (i, j)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.9)
        low, high = np.nanmin(grid), np.nanmax(grid)
        for i in range(len(row_values)):
            for j in range(len(column_values)):
                if grid[i, j] == grid[i, j]:
                    light = high > low and (grid[i, j] - low) / (high - low) > 0.6  # viridis is light at the top
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if light else "white")
        if chosen is not None:
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((chosen[1] - 0.5, chosen[0] - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2.5))
        ax.set_xticks(range(len(column_values)), [_short(v) for v in column_values], fontsize=8)
        ax.set_yticks(range(len(row_values)), [_short(v) for v in row_values], fontsize=8)
        ax.set_xlabel(columns_key)
        ax.set_ylabel(rows_key)
        ax.set_title(f"{method}: {title}", fontsize=10)
    return fig


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


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
    colors = method_colors(_methods(results))
    grouped = by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        for method in _methods(members):
            rows = [row for result in members for row in result.rows if row["method"] == method]
            axis = _prior_axis(rows[0].get("shifted_priors") or {})
            if not axis:
                continue
            values = [float(np.mean([row["shifted_priors"][key] for row in rows])) for key, _ in axis]
            ax.plot([x for _, x in axis], values, marker="o", markersize=3, linewidth=1, label=method,
                    color=colors[method])
        ticks = _prior_axis(members[0].rows[0].get("shifted_priors") or {})
        ax.set_xticks([x for _, x in ticks], [key.replace("ward_", " ") for key, _ in ticks], rotation=45, fontsize=8)
        _finish(ax, label, "test prior: backward ← uniform → forward (imbalance)", "test accuracy (%)")
    _legend(fig, axes)
    return fig


# ----------------------------------------------------------------------------------------------- the selection


def report_figures(results: list[Result], table: dict[str, dict[str, dict]]) -> list[Drawn]:
    """Every figure of a report over `results` (labelled already; `table` is stats.aggregate_rows of them), in page
    order, each with its caption. compare writes the same figures as PNG files beside results.json."""
    drawn: list[Drawn] = []
    grouped = by_label(results)
    several = len(grouped) > 1
    if len(table) > 1:
        drawn.append(Drawn("groups", figure_groups(table), "Many / Medium / Few / All test accuracy for each input "
                           "label (Figure 1 style), a line per classifier; bars are 95% intervals (t over seeds "
                           "when a label has several inputs, else the test bootstrap).", wide=True))
    drawn.append(Drawn("per_class", figure_per_class(results), "Test accuracy of every class, classes ordered by "
                       "their train images (most first), a line per classifier (the mean over a label's seeds).",
                       wide=several))
    notes: list[str] = []
    norms = figure_weight_norms(results, notes)
    if norms is not None:
        drawn.append(Drawn("weight_norms", norms, "Classifier weight norms ||w_j||, classes ordered by their train "
                           "images (grey bars), for the methods with per-class weights (paper Fig. 2, left); the "
                           "first seed of each label.", wide=several, notes=notes))
    for name in dict.fromkeys(n for r in results for n in (r.results.get("curves") or {})):
        chosen = any((members[0].results["curves"].get(name) or {}).get("chosen") is not None
                     for members in grouped.values() if name in (members[0].results.get("curves") or {}))
        figure = figure_curves(results, name)
        if figure is not None:
            drawn.append(Drawn(name, figure, f"Selection curve {name}: accuracy per group on the selection split "
                               "against the hyperparameter (paper Fig. 2, right)"
                               + ("; the dashed line is the value chosen." if chosen else
                                  "; the method that chooses it was not run, so no value is marked."),
                               wide=several))
    drawn.append(Drawn("reliability", figure_reliability(results), "Reliability diagrams: test accuracy against "
                       "confidence in 15 bins, markers sized by the bin's test rows, whose counts are beneath (log "
                       "scale); the diagonal is perfect calibration. The first seed of each label.", wide=several))
    if any(row.get("shifted_priors") for r in results for row in r.rows):
        drawn.append(Drawn("shifted_priors", figure_shifted_priors(results), "Test accuracy if the test classes "
                           "followed a long-tailed prior: forward keeps the train order, backward reverses it, at "
                           "each imbalance factor.", wide=several))
    return drawn


def confusion_figures(results: list[Result]) -> list[Drawn]:
    """Confusion heatmaps (up to HEATMAP_CLASSES classes), per label: the first method (the baseline, usually
    Joint) and the best by mean per-class accuracy, side by side."""
    drawn = []
    grouped = by_label(results)
    for position, (label, members) in enumerate(grouped.items()):
        rows = members[0].rows
        if not any(row.get("confusion") for row in rows):
            continue
        best = max(rows, key=lambda row: _float(row.get("mean_per_class")) if row.get("mean_per_class") is not None
                   else -1.0)["method"]
        for method in dict.fromkeys((rows[0]["method"], best)):
            figure = figure_confusion(members[0], method, members)
            if figure is not None:
                which = "best mean/class" if method == best else "first method"
                stem = f"confusion_{method}" if len(grouped) == 1 else f"confusion_{position}_{method}"
                drawn.append(Drawn(stem, figure, f"Confusion matrix of {method} on {label} "
                                   f"({which}): each row is a true class, its cells the share of its test rows "
                                   "predicted as each class (summed over seeds).", wide=False))
    return drawn


def grid_figures(results: list[Result]) -> tuple[list[Drawn], list[str]]:
    """A figure per method grid with one or two varying hyperparameters (a line, or selection and test heatmaps),
    from each label's first input; sentences for the grids that get only a table."""
    drawn, notes = [], []
    for label, members in by_label(results).items():
        result = members[0]
        points = result.results.get("grids") or []
        for method in dict.fromkeys(p["method"] for p in points):
            mine = [p for p in points if p["method"] == method]
            figure = figure_grid(mine, method, str(result.results.get("selected_on")))
            keys = list(dict.fromkeys(k for p in mine for k in p["params"]))
            if figure is None:
                notes.append(f"{method} on {label}: {len(keys)} hyperparameters vary ({', '.join(keys)}), so its "
                             "grid is in the table only.")
                continue
            shape = "against " + keys[0] if len(keys) == 1 else f"over {keys[0]} × {keys[1]}"
            drawn.append(Drawn(f"grid_{method}", figure, f"{method} on {label}: mean per-class accuracy {shape}, on "
                               f"the selection split ({result.results.get('selected_on')}), which made the choice"
                               + (", and on test, computed after it" if any(p.get("test") for p in mine) else "")
                               + "; the chosen point is marked.", wide=len(keys) == 2))
    return drawn, notes


@dataclass
class PageFigures:
    """Every figure of a page, by section: the main grid, the confusion heatmaps, the grid figures and the
    sentences on grids shown as tables only. compare saves each as a PNG file and renders the same objects."""

    main: list[Drawn]
    confusion: list[Drawn]
    grids: list[Drawn]
    grid_notes: list[str]

    def all(self) -> list[Drawn]:
        return [*self.main, *self.confusion, *self.grids]


def page_figures(results: list[Result], table: dict[str, dict[str, dict]]) -> PageFigures:
    """Every figure of the page over `results` (drawn under plain_text_figures by the caller)."""
    grids, notes = grid_figures(results)
    return PageFigures(report_figures(results, table), confusion_figures(results), grids, notes)


def plot_sampling_weights(path: Path, class_counts, *, epochs: int) -> dict:
    """Figure 3: each sampler's class probabilities p_j (classes by decreasing n_j), and progressive sampling's at
    several epochs, from the samplers' own functions. Writes the PNG; returns the values drawn."""
    from ltcache.core.sampling import SAMPLERS

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
        ax.legend(fontsize=LEGEND_POINTS)
        ax.grid(alpha=0.3)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return {"columns": list(values), "values": values}


def plain_text_figures():
    """Figures whose labels are shown as written: matplotlib would read `$...$` in a method, class or folder name
    as mathtext (and fail on `m$\\foo$x`); ltcache's own labels use none."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def save_png(drawn: Drawn, path: Path) -> None:
    """Write a figure's PNG (the bytes the page embeds) to `path`, atomically."""
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(drawn.png()))
