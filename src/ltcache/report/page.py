"""`ltcache report`: one self-contained HTML page, and merged results.md / results.csv, for one or many comparisons.

Inputs are read and labelled by inputs.py; inputs that share a label are replicate seeds, shown as their mean with a
95% t-interval (stats.py); a single input shows its own bootstrap interval. The page is rendered from
templates/report.html.j2 with autoescaping. It has no script and loads nothing: every figure is an inline PNG and a
Content-Security-Policy forbids any request, so it opens from disk anywhere. Nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ltcache.core.errors import LtcacheError
from ltcache.core.folders import FolderKind, StagedFolder, write_marker
from ltcache.core.fsutil import atomic_write
from ltcache.report.figures import (
    encode_png,
    figure_curves,
    figure_groups,
    figure_per_class,
    figure_reliability,
    figure_shifted_priors,
    figure_weight_norms,
    plain_text_figures,
)
from ltcache.report.inputs import HEADINGS, KEYS, LOWER_IS_BETTER, Result, load_results, results_file
from ltcache.report.stats import aggregate_rows, shared_groups
from ltcache.report.tables import classes, csv_text, summary_table

REPORT = FolderKind("report folder", "report.json", "index.html", ("report_version", "sources"),
                    self_hash="report_sha256")
REPORT_VERSION = 1


def _best(table: dict[str, dict[str, dict]], key: str) -> float | None:
    means = [stats[key]["mean"] for methods in table.values() for stats in methods.values()
             if stats[key]["mean"] == stats[key]["mean"]]
    if not means:
        return None
    return min(means) if key in LOWER_IS_BETTER else max(means)


def _table_context(table: dict[str, dict[str, dict]]) -> dict:
    """The results table as plain values for the template (escaped there, whatever their type)."""
    keys = KEYS
    groups = shared_groups(table) or {}
    heads = [HEADINGS[k] + (f" ({classes(groups[k])})" if groups.get(k) is not None else "") for k in keys]
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

    environment = jinja2.Environment(loader=jinja2.PackageLoader("ltcache.report", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.get_template("report.html.j2")


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
            data, width, height = encode_png(fig)
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


def build_report(inputs: Iterable[Path | str], out: Path | str, *, by: str | None = None, title: str | None = None,
                 overwrite: bool = False, labels: Sequence[str] | None = None) -> dict[str, str]:
    """`ltcache report`: read every input's results.json, label it (`labels`, one per input, or see `load_results`),
    write OUT/index.html (self-contained), results.md and
    results.csv (merged over inputs) and report.json (what was read). OUT is built beside its place and moved in
    whole; with `overwrite` it replaces an earlier report folder, and nothing else, once the new one is complete."""
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
