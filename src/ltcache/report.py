"""Result tables (Markdown, CSV, JSON) and the two plots of paper Fig. 2."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ltcache.fsutil import atomic_write, write_json  # noqa: E402

NORM_PLOT_METHODS = ("joint", "crt", "tau_norm", "lws")
COLUMNS = ("many", "medium", "few", "all", "mean_per_class")


def format_chosen(chosen: dict) -> str:
    keep = {k: v for k, v in chosen.items() if k not in ("selection_mean_per_class",)}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN when a group has no test samples


def _interval(row: dict, key: str) -> str:
    ci = row.get("ci95", {}).get(key)
    return f"{_pct(ci[0])}–{_pct(ci[1])}" if ci else "-"


def markdown_table(summary: dict) -> str:
    """One row per method; with calibration and bootstrap results when the rows carry them."""
    groups = summary["groups"]
    rich = any("ece" in row for row in summary["rows"])
    seeded = any("seeds" in row for row in summary["rows"])
    header = (f"| method | Many ({groups['many']}) | Medium ({groups['medium']}) | Few ({groups['few']}) "
              "| All | mean/class")
    header += " | All 95% CI | ECE |" if rich else " |"
    header += " All over seeds |" if seeded else ""
    lines = [header + " chosen |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if rich else "") + ("---:|" if seeded else "") + "---|"]
    for row in summary["rows"]:
        cells = " | ".join(_pct(row[c]) for c in COLUMNS)
        extra = f" | {_interval(row, 'all')} | {_pct(row['ece'])}" if rich else ""
        if seeded:
            stats = row.get("seeds", {}).get("all")
            extra += (f" | {stats['mean']:.2f} ± {stats['ci95'][1] - stats['mean']:.2f} (n={row['seeds']['n']})"
                      if stats else " | -")
        lines.append(f"| {row['method']} | {cells}{extra} | {format_chosen(row['chosen'])} |")
    return "\n".join(lines)


def shifted_prior_table(rows: list[dict]) -> str:
    """Accuracy under forward / backward long-tailed test priors; logit adjustment aimed at each prior gets a row."""
    keys = [k for k in rows[0].get("shifted_priors", {}) if k.startswith("forward")][::-1]
    keys += [k for k in rows[0].get("shifted_priors", {}) if k.startswith("backward")]
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(_pct(row["shifted_priors"][k]) for k in keys) + " |")
        if "shifted_priors_adapted" in row:
            lines.append(f"| {row['method']} → the prior | "
                         + " | ".join(_pct(row["shifted_priors_adapted"][k]) for k in keys) + " |")
    return "\n".join(lines)


def tau_table(curve: list[dict], chosen_tau: float | None = None) -> str:
    lines = ["| tau | Many | Medium | Few | All | mean/class |", "|---:|---:|---:|---:|---:|---:|"]
    for entry in curve:
        mark = " *" if chosen_tau is not None and entry["tau"] == chosen_tau else ""
        lines.append(f"| {entry['tau']:g}{mark} | " + " | ".join(_pct(entry[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


CALIBRATION = ("ece", "ece_many", "ece_medium", "ece_few", "temperature", "ece_ts", "ece_many_ts", "ece_medium_ts",
               "ece_few_ts")
INTERVAL_KEYS = ("all", "mean_per_class", "many", "medium", "few")


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    intervals = [f"{key}_ci95_{end}" for key in INTERVAL_KEYS for end in ("low", "high")]
    writer.writerow(["method", *COLUMNS, *CALIBRATION, *intervals, "chosen", "fit_seconds"])
    for row in rows:
        ci = row.get("ci95")
        bounds = [round(v, 4) for key in INTERVAL_KEYS for v in ci[key]] if ci else [""] * len(intervals)
        writer.writerow([row["method"], *(round(row[c], 4) for c in (*COLUMNS, *CALIBRATION)), *bounds,
                         format_chosen(row["chosen"]), row["fit_seconds"]])
    return buffer.getvalue()


def plot_reliability(path: Path, rows: list[dict]) -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per method."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for row in rows:
        bins = row["reliability"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                label=f"{row['method']} (ECE {row['ece']:.1f})")
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_weight_norms(path: Path, weight_norms: dict, class_counts) -> None:
    """Fig. 2 (left): per-class weight norms, classes sorted by descending train count."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in NORM_PLOT_METHODS:
        if name in weight_norms:
            ax.plot(np.asarray(weight_norms[name])[order], marker="o", markersize=3, label=name)
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
        ax.set_title(f"none of {', '.join(NORM_PLOT_METHODS)} was run")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_tau_curve(path: Path, curve: list[dict], selected_on: str, chosen_tau: float | None) -> None:
    """Fig. 2 (right): accuracy per group against tau, on the selection split."""
    taus = [entry["tau"] for entry in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("many", "medium", "few", "all"):
        ax.plot(taus, [entry[key] for entry in curve], marker="o", markersize=3, label=key.capitalize())
    if chosen_tau is not None:
        ax.axvline(chosen_tau, color="black", linestyle="--", linewidth=1, label=f"chosen tau = {chosen_tau:g}")
    ax.set_xlabel("tau")
    ax.set_ylabel(f"accuracy on {selected_on} (%)")
    ax.set_title(f"tau-normalized classifier, selected on {selected_on}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_reports(folder: Path, summary: dict, *, weight_norms: dict, class_counts) -> dict:
    """results.{json,csv,md} and the two PNG plots; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen_tau = next((r["chosen"].get("tau") for r in summary["rows"] if r["method"] == "tau_norm"), None)
    paths = {name: folder / name for name in
             ("results.json", "results.csv", "results.md", "weight_norms.png", "tau_curve.png", "reliability.png")}
    write_json(paths["results.json"], {k: v for k, v in summary.items() if k != "reports"})
    atomic_write(paths["results.csv"], lambda tmp: tmp.write_text(_csv_text(summary["rows"])))
    markdown = (f"Selected on **{summary['selected_on']}**; test scored once per method.\n\n"
                f"{markdown_table(summary)}\n\n### tau sweep on {summary['selected_on']}\n\n"
                f"{tau_table(summary['tau_curve'], chosen_tau)}\n")
    shifted = shifted_prior_table(summary["rows"])
    if shifted:
        markdown += ("\n### Shifted test priors\n\nTest accuracy if its classes followed a forward (train order) or "
                     "backward long-tailed prior with the given imbalance; `→ the prior` is logit adjustment aimed at "
                     "each prior, its tau chosen on the selection split reweighted to it.\n\n" + shifted + "\n")
    atomic_write(paths["results.md"], lambda tmp: tmp.write_text(markdown))
    plot_weight_norms(paths["weight_norms.png"], weight_norms, class_counts)
    plot_tau_curve(paths["tau_curve.png"], summary["tau_curve"], summary["selected_on"], chosen_tau)
    plot_reliability(paths["reliability.png"], summary["rows"])
    return {name: str(path) for name, path in paths.items()}
