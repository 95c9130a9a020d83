"""Result tables (Markdown, CSV, JSON), the ablation table, and the plots of paper Fig. 2 and calibration.

Everything here reads a `Comparison` (lab.py) and its typed rows; which methods add a weight-norm line or a
selection curve is their registry metadata, so no method is named here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ltcache.fsutil import atomic_write, write_json
from ltcache.htmlreport import new_figure

if TYPE_CHECKING:
    from ltcache.lab import Comparison, Curve, Row

COLUMNS = ("many", "medium", "few", "all", "mean_per_class")
MORE = ("harmonic_mean", "geometric_mean", "top5")  # the per-class means that punish a class left behind, top-5
CALIBRATION = ("ece", "ece_many", "ece_medium", "ece_few")
INTERVAL_KEYS = ("all", "mean_per_class", "many", "medium", "few")


def format_chosen(chosen: Mapping) -> str:
    """What a method chose, short: grid values first, the selection score left out."""
    grid = chosen.get("grid")
    keep = [f"{k}={v}" for k, v in chosen.items() if k not in ("selection_mean_per_class", "grid")]
    if grid:
        picked = ", ".join(f"{k}={v}" for k, v in grid.items()
                           if k not in ("points", "selected_on", "selection_mean_per_class"))
        keep.insert(0, f"grid [{picked}] of {grid['points']}")
    return ", ".join(keep) or "-"


def group_headers(groups: Mapping[str, int] | None) -> str:
    """'Many (5 classes) | Medium (2 classes) | Few (3 classes)': every table states the size of each shot group."""
    if not groups:
        return "Many | Medium | Few"
    return " | ".join(f"{name} ({groups[key]} class{'' if groups[key] == 1 else 'es'})"
                      for key, name in (("many", "Many"), ("medium", "Medium"), ("few", "Few")))


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN when a group has no test samples


def accuracy_table(groups: Mapping[str, int], entries: Iterable[tuple[str, object, Mapping]]) -> str:
    """A Markdown table of (label, accuracy, chosen) entries; accuracy has the attributes many ... mean_per_class."""
    lines = [f"| method | {group_headers(groups)} | All | mean/class | chosen |", "|---|---:|---:|---:|---:|---:|---|"]
    for label, accuracy, chosen in entries:
        cells = " | ".join(_pct(getattr(accuracy, c)) for c in COLUMNS)
        lines.append(f"| {label} | {cells} | {format_chosen(chosen)} |")
    return "\n".join(lines)


def markdown_table(comparison: Comparison) -> str:
    """One row per method: Many / Medium / Few / All / mean per class, its harmonic and geometric means, top-5,
    the All interval, ECE, the mean over seeds when the rows carry them, and with the protocol audit the mean per
    class had the method chosen on test, and that optimism."""
    rows = comparison.rows
    groups = comparison.groups
    intervals = any(row.evaluation.intervals for row in rows)
    seeded = any(row.seeds for row in rows)
    audited = any(row.audit for row in rows)
    header = f"| method | {group_headers(groups)} | All | mean/class | HM | GM | top-5 | All 95% CI | ECE |"
    header += " All over seeds |" if seeded else ""
    header += " mean/class if chosen on test | optimism |" if audited else ""
    lines = [header + " chosen |", "|---|" + "---:|" * 10 + ("---:|" if seeded else "")
             + ("---:|---:|" if audited else "") + "---|"]
    for row in rows:
        evaluation = row.evaluation
        cells = " | ".join(_pct(getattr(evaluation, c)) for c in COLUMNS)
        more = [getattr(evaluation.accuracy, c) for c in MORE]
        cells += " | " + " | ".join("-" if v is None else _pct(v) for v in more)
        ci = (evaluation.intervals or {}).get("all")
        extra = f" | {_pct(ci[0])}–{_pct(ci[1])}" if ci and intervals else " | -"
        extra += f" | {_pct(evaluation.calibration.ece)}"
        if seeded:
            stats = (row.seeds or {}).get("all")
            extra += (f" | {stats['mean']:.2f} ± {stats['ci95'][1] - stats['mean']:.2f} (n={row.seeds['n']})"
                      if stats else " | -")
        if audited:
            audit = row.audit or {}
            extra += (f" | {_pct(audit['test_if_chosen_on_test']['mean_per_class'])} | "
                      f"{audit['optimism_mean_per_class']:+.2f}" if audit else " | - | -")
        lines.append(f"| {row.method} | {cells}{extra} | {format_chosen(row.chosen)} |")
    return "\n".join(lines)


def shifted_prior_table(rows: list[Row]) -> str:
    """Accuracy under forward / backward long-tailed test priors; a method's own analysis aimed at each prior
    (an analysis named shifted_priors_*, keyed like the priors) gets a row of its own."""
    priors = rows[0].evaluation.shifted_priors if rows else {}
    keys = [k for k in priors if k.startswith("forward")][::-1] + [k for k in priors if k.startswith("backward")]
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        lines.append(f"| {row.method} | " + " | ".join(_pct(row.evaluation.shifted_priors[k]) for k in keys) + " |")
        for name, values in row.analyses.items():
            if name.startswith("shifted_priors") and isinstance(values, dict) and set(keys) <= set(values):
                lines.append(f"| {row.method} → the prior | " + " | ".join(_pct(values[k]) for k in keys) + " |")
    return "\n".join(lines)


def curve_table(curve: Curve, groups: Mapping[str, int] | None = None) -> str:
    """A selection curve: every grid value with its accuracies on the selection split, the chosen one starred."""
    lines = [f"| {curve.param} | {group_headers(groups)} | All | mean/class |", "|---:|---:|---:|---:|---:|---:|"]
    for entry in curve.entries:
        mark = " *" if curve.chosen is not None and entry[curve.param] == curve.chosen else ""
        lines.append(f"| {entry[curve.param]:g}{mark} | " + " | ".join(_pct(entry[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def ablation_table(comparison: Comparison) -> str:
    """Every grid point: its values, selection score and test accuracy, the selected point marked. The test
    numbers are for reading only; the choice was made on the selection split before they were computed."""
    sizes = group_headers(comparison.groups).replace("Many", "test Many").replace("Medium", "test Medium").replace(
        "Few", "test Few")
    lines = [f"| method | point | selection ({comparison.selected_on}) mean/class | {sizes} | test All "
             "| test mean/class | selected |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in comparison.rows:
        for point in row.grid or []:
            values = ", ".join(f"{k}={v}" for k, v in point.params.items()) or "-"
            test = " | ".join(_pct(getattr(point.test, c)) if point.test else "-" for c in COLUMNS)
            lines.append(f"| {row.method} | {values} | {_pct(point.selection)} | {test} | "
                         f"{'**yes**' if point.selected else ''} |")
    return "\n".join(lines)


def _csv_text(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    intervals = [f"{key}_ci95_{end}" for key in INTERVAL_KEYS for end in ("low", "high")]
    calibration = (*CALIBRATION, "temperature", *(f"{key}_ts" for key in CALIBRATION))
    audit = ["mean_per_class_if_chosen_on_test", "optimism_mean_per_class"]
    sizes = ["n_many", "n_medium", "n_few"]  # the classes in each shot group
    writer.writerow(["method", *COLUMNS, *MORE, *calibration, *intervals, *audit, "chosen", "fit_seconds", *sizes])
    for row in rows:
        evaluation = row.evaluation
        ci = evaluation.intervals
        bounds = [round(v, 4) for key in INTERVAL_KEYS for v in ci[key]] if ci else [""] * len(intervals)
        values = [getattr(evaluation, c) for c in COLUMNS] + [getattr(evaluation.accuracy, c) for c in MORE]
        values += [getattr(evaluation.calibration, c) for c in CALIBRATION] + [evaluation.temperature]
        values += [getattr(evaluation.calibrated, c) for c in CALIBRATION]
        audited = ([round(row.audit["test_if_chosen_on_test"]["mean_per_class"], 4),
                    round(row.audit["optimism_mean_per_class"], 4)] if row.audit else ["", ""])
        writer.writerow([row.method, *("" if v is None else round(v, 4) for v in values), *bounds, *audited,
                         format_chosen(row.chosen), round(row.fit_seconds, 3),
                         *(getattr(evaluation.accuracy, size) for size in sizes)])
    return buffer.getvalue()


def _ablation_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = sorted({key for row in comparison.rows for point in row.grid or [] for key in point.params})
    writer.writerow(["method", *keys, "selection_mean_per_class", *(f"test_{c}" for c in COLUMNS), "selected"])
    for row in comparison.rows:
        for point in row.grid or []:
            writer.writerow([row.method, *(point.params.get(k, "") for k in keys), round(point.selection, 4),
                             *((round(getattr(point.test, c), 4) if point.test else "") for c in COLUMNS),
                             int(point.selected)])
    return buffer.getvalue()


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_reliability(path: Path, rows: list[Row]) -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per method."""
    fig, ax = new_figure((5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for row in rows:
        bins = row.evaluation.calibration.reliability
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                label=f"{row.method} (ECE {row.evaluation.calibration.ece:.1f})")
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_weight_norms(path: Path, weight_norms: Mapping, class_counts) -> None:
    """Fig. 2 (left): per-class weight norms, classes sorted by descending train count."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    fig, ax = new_figure((7, 4))
    for name, norms in weight_norms.items():
        ax.plot(np.asarray(norms)[order], marker="o", markersize=3, label=name)
    ax.set_xlabel("classes sorted by train count (descending)")
    ax.set_ylabel("classifier weight norm ||w_j||")
    counts_axis = ax.twinx()
    counts_axis.bar(range(len(order)), np.asarray(class_counts)[order], color="grey", alpha=0.2)
    counts_axis.set_ylabel("train images")
    ax.set_zorder(counts_axis.get_zorder() + 1)
    ax.patch.set_visible(False)
    if ax.lines:
        ax.legend()
    else:
        ax.set_title("no method of the weight-norm plot was run (see ltcache methods)")
    _save(fig, path)


def plot_curve(path: Path, curve: Curve, selected_on: str) -> None:
    """Fig. 2 (right) for a tau curve, and the same for any selection curve: accuracy per group against the
    hyperparameter, on the selection split."""
    values = [entry[curve.param] for entry in curve.entries]
    fig, ax = new_figure((7, 4))
    for key in ("many", "medium", "few", "all"):
        ax.plot(values, [entry[key] for entry in curve.entries], marker="o", markersize=3, label=key.capitalize())
    if curve.chosen is not None:
        ax.axvline(curve.chosen, color="black", linestyle="--", linewidth=1,
                   label=f"chosen {curve.param} = {curve.chosen:g}")
    ax.set_xlabel(curve.param)
    ax.set_ylabel(f"accuracy on {selected_on} (%)")
    ax.set_title(f"{curve.title}, selected on {selected_on}")
    ax.legend()
    _save(fig, path)


def write_reports(folder: Path, comparison: Comparison, *, ablation: bool = False,
                  shown_as: Path | None = None) -> dict[str, str]:
    """results.{json,csv,md}, the weight-norm, selection-curve and reliability plots, and with `ablation` the
    ablation.{json,csv,md} of every grid point; returns their paths. `shown_as`: where the folder will be once
    published (the page names that, not the staging folder it is written in)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["results.json", "results.csv", "results.md", "weight_norms.png",
             *(f"{name}.png" for name in comparison.curves), "reliability.png", "index.html"]
    if ablation:
        names += ["ablation.json", "ablation.csv", "ablation.md"]
    paths = {name: folder / name for name in names}
    summary = comparison.as_dict()
    write_json(paths["results.json"], summary)
    atomic_write(paths["results.csv"], lambda tmp: tmp.write_text(_csv_text(comparison.rows)))
    markdown = (f"Selected on **{comparison.selected_on}**; test scored once per method.\n\n"
                f"{markdown_table(comparison)}\n")
    for curve in comparison.curves.values():
        markdown += (f"\n### {curve.param} sweep on {comparison.selected_on}\n\n"
                     f"{curve_table(curve, comparison.groups)}\n")
    shifted = shifted_prior_table(comparison.rows)
    if shifted:
        markdown += ("\n### Shifted test priors\n\nTest accuracy if its classes followed a forward (train order) or "
                     "backward long-tailed prior with the given imbalance; `→ the prior` rows are a method's own "
                     "analysis aimed at each prior, its hyperparameter chosen on the selection split reweighted to "
                     "it.\n\n" + shifted + "\n")
    atomic_write(paths["results.md"], lambda tmp: tmp.write_text(markdown))
    from ltcache.htmlreport import Result, plain_text_figures, render_page

    with plain_text_figures():  # a method or cache named m$\foo$x is a label, not mathtext
        plot_weight_norms(paths["weight_norms.png"], comparison.weight_norms(), comparison.class_counts)
        for name, curve in comparison.curves.items():
            plot_curve(paths[f"{name}.png"], curve, comparison.selected_on)
        plot_reliability(paths["reliability.png"], comparison.rows)

    page = render_page([Result(Path(shown_as or folder).parent, summary, label=Path(comparison.cache).name)],
                       title=f"ltcache compare: {Path(comparison.cache).name}")
    atomic_write(paths["index.html"], lambda tmp: tmp.write_text(page, encoding="utf-8"))
    if ablation:
        write_json(paths["ablation.json"], {"selected_on": comparison.selected_on, "points": comparison.ablation()})
        atomic_write(paths["ablation.csv"], lambda tmp: tmp.write_text(_ablation_csv(comparison)))
        text = (f"Every grid point, fitted on train and chosen on **{comparison.selected_on}** by mean per-class "
                "accuracy; test numbers are reported after the choice and never used for it.\n\n")
        atomic_write(paths["ablation.md"], lambda tmp: tmp.write_text(text + ablation_table(comparison) + "\n"))
    return {name: str(path) for name, path in paths.items()}
