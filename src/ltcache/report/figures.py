"""Every figure ltcache draws, drawn once: the compare folder's PNGs and the report page's inline figures come from
these functions (a panel per input label). Each figure has its own Agg canvas (new_figure): no pyplot, so a
notebook's matplotlib backend is never switched."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ltcache.core.fsutil import atomic_write
from ltcache.report.inputs import HEADINGS, MAX_PANELS, Result


def encode_png(fig) -> tuple[str, int, int]:
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
    """Fig. 2 (left): per-class weight norms, classes sorted by train count (their counts as grey bars behind), a
    panel per label (its first input)."""
    grouped = _by_label(results)
    fig, axes = _panels(len(grouped))
    for ax, (label, members) in zip(axes, grouped.items(), strict=True):
        result = members[0]
        counts = np.asarray(result.results.get("class_counts") or [], dtype=np.float64)
        order = np.argsort(-counts, kind="stable")
        for method, norms in (result.results.get("weight_norms") or {}).items():
            ax.plot(np.asarray(norms)[order], marker="o", markersize=3, linewidth=1, label=method)
        if len(counts):
            behind = ax.twinx()
            behind.bar(range(len(order)), counts[order], color="grey", alpha=0.2)
            behind.set_ylabel("train images")
            ax.set_zorder(behind.get_zorder() + 1)
            ax.patch.set_visible(False)
        _finish(ax, label if ax.lines else f"{label}: no method of the weight-norm plot was run (see ltcache methods)",
                "classes by train count (descending)", "classifier weight norm ||w_j||")
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
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return {"columns": list(values), "values": values}


def plain_text_figures():
    """Figures whose labels are shown as written: matplotlib would read `$...$` in a method, class or folder name
    as mathtext (and fail on `m$\\foo$x`); ltcache's own labels use none."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def save_png(fig, path: Path, *, dpi: int = 120) -> None:
    """Write `fig` to `path` as a PNG, atomically."""
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
