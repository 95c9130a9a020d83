"""Every table ltcache writes, from results.json dicts: compare's results.md / results.csv / ablation tables and the
sweep-tau tables (one row per method), and the report's merged table and CSV (one row per input label and method).
Which methods add a weight-norm line or a selection curve is their registry metadata, so no method is named here."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping

from ltcache.report.inputs import HEADINGS, KEYS, Result, _short
from ltcache.report.stats import shared_groups

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
    return " | ".join(f"{name} ({classes(groups[key])})" for key, name in (("many", "Many"), ("medium", "Medium"),
                                                                           ("few", "Few")))


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"  # NaN (null in JSON): a group without samples


def accuracy_table(groups: Mapping[str, int], entries: Iterable[tuple[str, Mapping, Mapping]]) -> str:
    """A Markdown table of (label, accuracy, chosen) entries; accuracy has the keys many ... mean_per_class."""
    lines = [f"| method | {group_headers(groups)} | All | mean/class | chosen |", "|---|---:|---:|---:|---:|---:|---|"]
    for label, accuracy, chosen in entries:
        cells = " | ".join(_pct(accuracy[c]) for c in COLUMNS)
        lines.append(f"| {label} | {cells} | {format_chosen(chosen)} |")
    return "\n".join(lines)


def markdown_table(summary: Mapping) -> str:
    """One row per method of a results.json: Many / Medium / Few / All / mean per class, its harmonic and geometric
    means, top-5, the All interval, ECE, the mean over seeds when the rows carry them, and with the protocol audit
    the mean per class had the method chosen on test, and that optimism."""
    rows = summary["rows"]
    intervals = any(row.get("ci95") for row in rows)
    seeded = any(row.get("seeds") for row in rows)
    audited = any(row.get("protocol_audit") for row in rows)
    ensembled = [row.get("tta") for row in rows if row.get("tta")]
    header = (f"| method | {group_headers(summary.get('groups'))} | All | mean/class | HM | GM | top-5 | All 95% CI "
              "| ECE |")
    header += " All over seeds |" if seeded else ""
    header += " mean/class if chosen on test | optimism |" if audited else ""
    header += (f" Few, {ensembled[0]['crops']} crops | All, {ensembled[0]['crops']} crops | mean/class, "
               f"{ensembled[0]['crops']} crops |") if ensembled else ""
    shifted = [row.get("test_prior") for row in rows if row.get("test_prior")]
    header += (f" Few, test prior {shifted[0]['prior']} | All, test prior {shifted[0]['prior']} "
               f"({shifted[0]['mode']}) |") if shifted else ""
    lines = [header + " chosen |", "|---|" + "---:|" * 10 + ("---:|" if seeded else "")
             + ("---:|---:|" if audited else "") + ("---:|" * 3 if ensembled else "")
             + ("---:|" * 2 if shifted else "") + "---|"]
    for row in rows:
        cells = " | ".join(_pct(row[c]) for c in (*COLUMNS, *MORE))
        ci = (row.get("ci95") or {}).get("all")
        extra = f" | {_pct(ci[0])}–{_pct(ci[1])}" if ci and intervals else " | -"
        extra += f" | {_pct(row.get('ece'))}"
        if seeded:
            stats = (row.get("seeds") or {}).get("all")
            extra += (f" | {stats['mean']:.2f} ± {stats['ci95'][1] - stats['mean']:.2f} (n={row['seeds']['n']})"
                      if stats else " | -")
        if audited:
            audit = row.get("protocol_audit") or {}
            extra += (f" | {_pct(audit['test_if_chosen_on_test']['mean_per_class'])} | "
                      f"{audit['optimism_mean_per_class']:+.2f}" if audit else " | - | -")
        if ensembled:
            tta = row.get("tta")
            extra += "".join(f" | {_pct(tta[key])}" if tta else " | -" for key in ("few", "all", "mean_per_class"))
        if shifted:
            prior = row.get("test_prior")
            extra += "".join(f" | {_pct(prior[key])}" if prior else " | -" for key in ("few", "all"))
        lines.append(f"| {row['method']} | {cells}{extra} | {format_chosen(row['chosen'])} |")
    return "\n".join(lines)


def shifted_prior_table(rows: list[Mapping]) -> str:
    """Accuracy under forward / backward long-tailed test priors; a method's own analysis aimed at each prior
    (an analysis named shifted_priors_*, keyed like the priors) gets a row of its own."""
    priors = (rows[0].get("shifted_priors") or {}) if rows else {}
    keys = [k for k in priors if k.startswith("forward")][::-1] + [k for k in priors if k.startswith("backward")]
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(_pct(row["shifted_priors"][k]) for k in keys) + " |")
        for name, values in row.items():
            if (name != "shifted_priors" and name.startswith("shifted_priors") and isinstance(values, dict)
                    and set(keys) <= set(values)):
                lines.append(f"| {row['method']} → the prior | " + " | ".join(_pct(values[k]) for k in keys) + " |")
    return "\n".join(lines)


def curve_table(curve: Mapping, groups: Mapping[str, int] | None = None) -> str:
    """A selection curve ({param, entries, chosen}): every grid value with its accuracies on the selection split,
    the chosen one starred."""
    param, chosen = curve["param"], curve.get("chosen")
    lines = [f"| {param} | {group_headers(groups)} | All | mean/class |", "|---:|---:|---:|---:|---:|---:|"]
    for entry in curve["entries"]:
        mark = " *" if chosen is not None and entry[param] == chosen else ""
        lines.append(f"| {entry[param]:g}{mark} | " + " | ".join(_pct(entry[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def ablation_table(points: list[Mapping], *, groups: Mapping[str, int] | None, selected_on: str) -> str:
    """Every grid point (Comparison.ablation()): its values, selection score and test accuracy, the selected point
    marked. The test numbers are for reading only; the choice was made on the selection split before they were
    computed."""
    sizes = group_headers(groups).replace("Many", "test Many").replace("Medium", "test Medium").replace(
        "Few", "test Few")
    lines = [f"| method | point | selection ({selected_on}) mean/class | {sizes} | test All "
             "| test mean/class | selected |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for point in points:
        values = ", ".join(f"{k}={v}" for k, v in point["params"].items()) or "-"
        test = " | ".join(_pct(point["test"][c]) if point["test"] else "-" for c in COLUMNS)
        lines.append(f"| {point['method']} | {values} | {_pct(point['selection_mean_per_class'])} | {test} | "
                     f"{'**yes**' if point['selected'] else ''} |")
    return "\n".join(lines)


def _rounded(value):
    """A CSV cell: the number to 4 decimals, empty for a missing one (NaN is null in results.json)."""
    return "" if value is None or value != value else round(value, 4)


def results_csv(rows: list[Mapping]) -> str:
    """compare's results.csv: one line per method, every metric, interval, calibration and the audit."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    intervals = [f"{key}_ci95_{end}" for key in INTERVAL_KEYS for end in ("low", "high")]
    calibration = (*CALIBRATION, "temperature", *(f"{key}_ts" for key in CALIBRATION))
    audit = ["mean_per_class_if_chosen_on_test", "optimism_mean_per_class"]
    sizes = ["n_many", "n_medium", "n_few"]  # the classes in each shot group
    ensembled = any(row.get("tta") for row in rows)
    tta = [f"tta_{key}" for key in (*COLUMNS, "top5")] + ["tta_crops"] if ensembled else []
    shifted = any(row.get("test_prior") for row in rows)
    prior_columns = ["test_prior", "test_prior_mode", *(f"test_prior_{key}" for key in COLUMNS), "test_prior_rows"] \
        if shifted else []
    writer.writerow(["method", *COLUMNS, *MORE, *calibration, *intervals, *audit, "chosen", "fit_seconds", *sizes,
                     *tta, *prior_columns])
    for row in rows:
        ci = row.get("ci95")
        bounds = [_rounded(v) for key in INTERVAL_KEYS for v in ci[key]] if ci else [""] * len(intervals)
        values = [row.get(c) for c in (*COLUMNS, *MORE, *calibration)]
        checked = row.get("protocol_audit")
        audited = ([_rounded(checked["test_if_chosen_on_test"]["mean_per_class"]),
                    _rounded(checked["optimism_mean_per_class"])] if checked else ["", ""])
        ensemble = row.get("tta")
        tta_cells = ([*(_rounded(ensemble.get(key)) for key in (*COLUMNS, "top5")), ensemble.get("crops")]
                     if ensemble else [""] * len(tta))
        prior = row.get("test_prior")
        prior_cells = ([prior["prior"], prior["mode"], *(_rounded(prior.get(key)) for key in COLUMNS), prior["rows"]]
                       if prior else [""] * len(prior_columns))
        writer.writerow([row["method"], *(_rounded(v) for v in values), *bounds, *audited,
                         format_chosen(row["chosen"]), round(row["fit_seconds"], 3), *(row.get(s) for s in sizes),
                         *tta_cells, *prior_cells])
    return buffer.getvalue()


def ablation_csv(points: list[Mapping]) -> str:
    """compare --ablation's ablation.csv: one line per grid point."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = sorted({key for point in points for key in point["params"]})
    writer.writerow(["method", *keys, "selection_mean_per_class", *(f"test_{c}" for c in COLUMNS), "selected"])
    for point in points:
        writer.writerow([point["method"], *(point["params"].get(k, "") for k in keys),
                         _rounded(point["selection_mean_per_class"]),
                         *((_rounded(point["test"][c]) if point["test"] else "") for c in COLUMNS),
                         int(point["selected"])])
    return buffer.getvalue()


def results_markdown(summary: Mapping) -> str:
    """compare's results.md: the method table, each selection curve, and the shifted-prior table."""
    selected_on = summary["selected_on"]
    markdown = f"Selected on **{selected_on}**; test scored once per method.\n\n{markdown_table(summary)}\n"
    for curve in (summary.get("curves") or {}).values():
        markdown += (f"\n### {curve['param']} sweep on {selected_on}\n\n"
                     f"{curve_table(curve, summary.get('groups'))}\n")
    shifted = shifted_prior_table(summary["rows"])
    if shifted:
        markdown += ("\n### Shifted test priors\n\nTest accuracy if its classes followed a forward (train order) or "
                     "backward long-tailed prior with the given imbalance; `→ the prior` rows are a method's own "
                     "analysis aimed at each prior, its hyperparameter chosen on the selection split reweighted to "
                     "it.\n\n" + shifted + "\n")
    return markdown


def classes(count: int) -> str:
    """'1 class', '5 classes'."""
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
    heads = [f"{HEADINGS[k]} ({classes(groups[k])})" if groups.get(k) is not None else HEADINGS[k] for k in keys]
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


CLIP_BENCHMARK_COLUMNS = ("dataset", "model", "pretrained", "task", "acc1", "acc5", "mean_per_class_recall", "method",
                          "many", "medium", "few", "selected_on", "input")


def clip_benchmark_model(result: Result) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark names them: open_clip's arch and tag, timm's model name and its weights,
    or the backbone and the checkpoint (its sha256 prefix) for an ltcache-trained one; 'random' for random weights."""
    backbone = (result.manifest.get("backbone") or {})
    model = backbone.get("model") if isinstance(backbone.get("model"), dict) else {}
    arch = backbone.get("arch") or result.provenance.get("backbone") or "-"
    if model:
        return str(model.get("name") or arch), str(model.get("tag") or model.get("weights") or "random")
    sha = backbone.get("checkpoint_sha256") or result.provenance.get("checkpoint_sha256")
    return str(arch), f"checkpoint:{sha[:12]}" if isinstance(sha, str) else "-"


def _fraction(value) -> float | str:
    """A percentage as CLIP_benchmark's fraction of 1; '' for a missing or NaN one."""
    return "" if not isinstance(value, (int, float)) or value != value else round(value / 100, 6)


def clip_benchmark_csv(results: list[Result]) -> str:
    """Every (input, method) as a CLIP_benchmark row: dataset, model, pretrained, task, acc1, acc5 and
    mean_per_class_recall as fractions (CLIP_benchmark's own scale), then ltcache's method, shot groups, selection
    split and input, so the rows merge into a table of CLIP_benchmark results. The task is the one the method's
    registration names (Method.task: zeroshot_classification for CLIP's zero-shot head, linear_probe for a frozen
    backbone's stage-1 head, a probe fitted on train), else ltcache/METHOD."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CLIP_BENCHMARK_COLUMNS)
    for result in results:
        model, pretrained = clip_benchmark_model(result)
        dataset = result.provenance.get("dataset") or (result.manifest.get("dataset") or {}).get("name") or "-"
        frozen = isinstance((result.manifest.get("backbone") or {}).get("model"), dict)
        for row in result.rows:
            method = row["method"]
            base = row.get("of", method)  # a crop or shifted-prior row (inputs.with_ensemble_rows) is its method's
            task = row.get("task") if isinstance(row.get("task"), str) else None
            if task is None or (task == "linear_probe" and not frozen):  # a trained classifier is not a probe
                task = f"ltcache/{base}"

            overall = [_fraction(row.get(key)) for key in ("all", "top5", "mean_per_class")]
            groups = [_fraction(row.get(key)) for key in ("many", "medium", "few")]
            writer.writerow([dataset, model, pretrained, task, *overall, method, *groups,
                             result.results.get("selected_on"), str(result.path)])
    return buffer.getvalue()
