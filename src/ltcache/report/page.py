"""`ltcache report`: one self-contained HTML page, and merged results.md / results.csv, for one or many comparisons.

Inputs are read and labelled by inputs.py; inputs that share a label are replicate seeds, shown as their mean with a
95% t-interval (stats.py); a single input shows its own bootstrap interval. The page is rendered from
templates/report.html.j2 with autoescaping. It has no script and loads nothing: every figure is an inline PNG and a
Content-Security-Policy forbids any request, so it opens from disk anywhere. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.folders import FolderKind, StagedFolder, write_marker
from ltcache.core.fsutil import atomic_write
from ltcache.report.figures import (
    Drawn,
    PageFigures,
    by_label,
    class_names,
    encode_png,
    mean_series,
    page_figures,
    plain_text_figures,
    quiet_nanmean,
)
from ltcache.report.inputs import HEADINGS, KEYS, LOWER_IS_BETTER, Result, _short, load_results, results_file
from ltcache.report.stats import aggregate_rows, shared_groups
from ltcache.report.tables import classes, clip_benchmark_csv, csv_text, summary_table

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
    heads = [{"name": HEADINGS[k], "sub": classes(groups[k]) if groups.get(k) is not None else ""} for k in keys]
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
    return {"heads": heads, "rows": rows, "own_sizes": not groups, "several": len(table) > 1}


PER_CLASS_ROWS = 100  # classes listed in full up to this many; beyond, the worst PER_CLASS_SHOWN
PER_CLASS_SHOWN = 50
CONFUSED_SHOWN = 5


def _pct(value, digits: int = 1) -> str:
    """A percentage for the page; '-' for a missing one (null, NaN, or anything but a number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return "-"
    return f"{value:.{digits}f}"


def _per_class_context(results: list[Result]) -> list[dict]:
    """Per label (its inputs averaged): every class with its train images, shot group and test accuracy per method,
    the best marked, worst first; and per method scikit-learn's precision / recall / F1 / support, worst F1 first."""
    sections = []
    for label, members in by_label(results).items():
        first = members[0]
        counts = first.results.get("class_counts") or []
        if not counts:
            continue
        names = class_names(first)
        thresholds = first.results.get("thresholds") or {"many": 100, "few": 20}
        series = {m: mean_series(members, m, "per_class") for m in dict.fromkeys(row["method"] for r in members
                                                                                   for row in r.rows)}
        methods = [m for m, values in series.items() if values is not None]
        if not methods:
            continue
        accuracy = np.array([series[m] for m in methods])  # methods x classes
        worst = np.nan_to_num(quiet_nanmean(accuracy, 0), nan=1e9)  # a class without any number goes last
        order = sorted(range(len(counts)), key=lambda c: (worst[c], c))
        shown = order if len(order) <= PER_CLASS_ROWS else order[:PER_CLASS_SHOWN]
        rows = []
        for c in shown:
            values = accuracy[:, c]
            present = values[~np.isnan(values)]
            top = float(present.max()) if len(present) and present.min() < present.max() else None  # no tie of all
            rows.append({"name": names[c], "index": c, "count": counts[c],
                         "group": _group(counts[c], thresholds),
                         "cells": [{"value": _pct(v), "best": top is not None and v == v
                                    and round(v, 1) == round(top, 1)} for v in values]})
        reports = []
        for method in methods:
            precision = mean_series(members, method, "per_class_precision")
            f1 = mean_series(members, method, "per_class_f1")
            if precision is None or f1 is None:
                continue
            recall = series[method]
            support = next(row.get("per_class_support") for row in first.rows if row["method"] == method)
            worst = sorted(range(len(counts)), key=lambda c: (np.nan_to_num(f1[c], nan=1e9), c))
            listed = worst if len(worst) <= PER_CLASS_ROWS else worst[:PER_CLASS_SHOWN]
            macro = [_pct(float(quiet_nanmean(a))) for a in (precision, recall, f1)]
            reports.append({"method": method, "macro": macro, "rows": [
                {"name": names[c], "precision": _pct(precision[c]), "recall": _pct(recall[c]), "f1": _pct(f1[c]),
                 "support": "-" if support is None else support[c]} for c in listed]})
        sections.append({"label": label, "methods": methods, "rows": rows, "classes": len(counts),
                         "cut": len(shown) < len(order), "shown": len(shown), "reports": reports,
                         "seeds": len(members)})
    return sections


def _group(count: int, thresholds: dict) -> str:
    many, few = thresholds.get("many"), thresholds.get("few")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (count, many, few)):
        return "-"  # never met in a results.json the reader accepted
    return "Many" if count > many else ("Few" if count < few else "Medium")


def _confused_context(results: list[Result]) -> list[dict]:
    """Per label (its first input), per method: the most-confused (true, predicted) pairs with counts and names."""
    sections = []
    for label, members in by_label(results).items():
        names = class_names(members[0])
        methods = []
        for row in members[0].rows:
            pairs = row.get("confused_pairs")
            if pairs:
                methods.append({"method": row["method"], "pairs": [
                    {"true": names[p["true"]], "predicted": names[p["predicted"]], "count": p["count"],
                     "share": f"{p['share']:.0f}%"} for p in pairs[:CONFUSED_SHOWN]]})
        if methods:
            sections.append({"label": label, "methods": methods})
    return sections


def _grid_context(results: list[Result]) -> list[dict]:
    """Every grid, as scikit-learn's cv_results_ reads: a row per point, its values, the selection score and its
    rank, the test scores (with --ablation, computed after the choice), the chosen point marked."""
    tables = []
    for label, members in by_label(results).items():
        points = members[0].results.get("grids") or []
        for method in dict.fromkeys(p["method"] for p in points):
            mine = [p for p in points if p["method"] == method]
            keys = list(dict.fromkeys(k for p in mine for k in p["params"]))
            scores = [round(_number(p["selection_mean_per_class"]), 6) for p in mine]
            tested = any(p.get("test") for p in mine)
            rows = []
            for point in mine:
                mine_score = round(_number(point["selection_mean_per_class"]), 6)
                rank = 1 + sum(score > mine_score for score in scores)  # ties share the best rank (cv_results_)
                test = point.get("test") or {}
                rows.append({"params": [_short(point["params"].get(k)) for k in keys],
                             "selection": _pct(point["selection_mean_per_class"], 2), "rank": rank,
                             "test": [_pct(test.get(k), 2) for k in ("mean_per_class", "all", "many", "medium", "few")]
                             if tested else [], "selected": point["selected"],
                             "seconds": point.get("fit_seconds")})
            tables.append({"label": label, "method": method, "columns": keys, "rows": rows, "tested": tested,
                           "selected_on": str(members[0].results.get("selected_on"))})
    return tables


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("-inf")


PROVENANCE_FIELDS = ("dataset", "backbone", "checkpoint_sha256", "checkpoint_format", "stage1_sampler",
                     "stage1_seed", "stage1_epochs", "cache_ltcache_version", "ltcache_version")
COMMANDS = ("train_command", "extract_command", "compare_command")


def _provenance_context(results: list[Result]) -> list[dict]:
    """Per input: its path and label, the fields (a hash short, whole on hover), the class counts summarized (all of
    them behind a disclosure), and its commands as monospace blocks that wrap at spaces."""
    blocks = []
    for result in results:
        prov = result.provenance
        fields = [{"name": "selected on", "text": str(result.results.get("selected_on")), "full": ""}]
        for key in PROVENANCE_FIELDS:
            value = prov.get(key)
            if value is None:
                continue
            text = str(value)
            hashed = key.endswith("sha256")  # short, the whole hash on hover (the same markup at any length)
            fields.append({"name": key.replace("_", " "), "text": text[:12] + ("…" if len(text) > 12 else "")
                           if hashed else text, "full": text if hashed else ""})
        counts = prov.get("class_counts") or result.results.get("class_counts") or []
        summary = (f"{len(counts)} classes, {min(counts)} to {max(counts)} train images (imbalance "
                   f"{max(counts) / max(min(counts), 1):.0f})" if counts else "")
        blocks.append({"label": result.label, "path": str(result.path), "fields": fields, "counts": summary,
                       "all_counts": ", ".join(f"{n}: {c}" for n, c in zip(class_names(result), counts, strict=False)),
                       "commands": [{"name": key.replace("_", " "), "text": str(prov[key])}
                                    for key in COMMANDS if prov.get(key)]})
    return blocks


@functools.lru_cache(maxsize=1)
def _template():
    """The page's template, compiled once per process (every compare renders one)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("ltcache.report", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.get_template("report.html.j2")


def _figure(drawn: Drawn) -> dict:
    data, width, height = encode_png(drawn.png())
    return {"name": drawn.name, "caption": drawn.caption, "data": data, "width": width, "height": height,
            "wide": drawn.wide, "notes": drawn.notes}


def _intro(results: list[Result], table: dict) -> list[str]:
    """The page's first sentences, in words: what was compared, how inputs were grouped, how it was scored."""
    methods = list(dict.fromkeys(m for methods in table.values() for m in methods))
    labels = list(table)
    if len(results) == 1:
        first = (f"One comparison of {_count(len(methods), 'classifier')} on {labels[0]} features.")
    elif len(labels) == 1:
        first = (f"{len(results)} seeds of one experiment ({labels[0]}), {_count(len(methods), 'classifier')}: "
                 "each number is their mean ± half its 95% t-interval.")
    else:
        seeded = [label for label in labels if sum(r.label == label for r in results) > 1]
        first = (f"{len(results)} comparisons in {len(labels)} groups ({', '.join(labels)}), "
                 f"{_count(len(methods), 'classifier')}."
                 + (" Inputs that share a group are seeds: their mean is shown ± half its 95% t-interval."
                    if seeded else ""))
    return [first]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_page(results: list[Result], *, title: str | None = None, drawn: PageFigures | None = None) -> str:
    """The self-contained HTML page for `results` (labelled already), rendered by templates/report.html.j2 with
    autoescaping: every value is escaped, whatever its type. `drawn`: the figures, when the caller drew them
    already (compare writes the same ones as PNG files)."""
    table = aggregate_rows(results)
    with plain_text_figures():
        drawn = drawn if drawn is not None else page_figures(results, table)
        figures = [_figure(d) for d in drawn.main]
        confusion = [_figure(d) for d in drawn.confusion]
        grid_figs = [_figure(d) for d in drawn.grids]
        grid_notes = drawn.grid_notes
    groups = shared_groups(table)
    sizes = (f"({groups['many']} / {groups['medium']} / {groups['few']} classes)" if groups else
             "(the class counts of each input in the table's last column)")
    selected = sorted({str(r.results.get("selected_on")) for r in results})
    thresholds = {json.dumps(r.results.get("thresholds") or {"many": 100, "few": 20}, sort_keys=True) for r in results}
    many, few = ("/".join(str(json.loads(t)[key]) for t in sorted(thresholds)) for key in ("many", "few"))
    title = title or ("ltcache report: " + ", ".join(dict.fromkeys(r.label for r in results)))
    return _template().render(
        title=title, intro=_intro(results, table), selected=", ".join(selected), many=many, few=few,
        sizes=sizes, table=_table_context(table), figures=figures, per_class=_per_class_context(results),
        confusion=confusion, confused=_confused_context(results), grids=_grid_context(results),
        grid_figures=grid_figs, grid_notes=grid_notes, provenance=_provenance_context(results),
        written=time.strftime("%Y-%m-%d %H:%M:%S"))


def build_report(inputs: Iterable[Path | str], out: Path | str, *, by: str | None = None, title: str | None = None,
                 overwrite: bool = False, labels: Sequence[str] | None = None) -> dict[str, str]:
    """`ltcache report`: read every input's results.json, label it (`labels`, one per input, or see `load_results`),
    write OUT/index.html (self-contained), results.md and
    results.csv (merged over inputs), clip_benchmark.csv (the same rows as CLIP_benchmark's) and report.json (what
    was read). OUT is built beside its place and moved in
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
        atomic_write(staged.path / "clip_benchmark.csv", lambda tmp: tmp.write_text(clip_benchmark_csv(results)))
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
    return {name: str(folder / name) for name in ("index.html", "results.md", "results.csv", "clip_benchmark.csv",
                                                   "report.json")}
