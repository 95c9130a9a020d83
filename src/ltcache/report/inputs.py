"""The report's inputs: results.json files that `ltcache compare` wrote, read, validated and labelled (`Result`).

Each input is what `ltcache compare` wrote (a cache, or a compare --out folder, holding reports/results.json). Inputs
are labelled by a provenance field (`--by backbone.resolved_config.sampler`; found automatically when the inputs
differ in stage-1 sampler, loss, backbone, dataset or selection split), and inputs that share a label are replicate
seeds: the page shows their mean with a 95% t-interval. A single input shows its own bootstrap interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ltcache.core.errors import LtcacheError

KEYS = ("many", "medium", "few", "all", "mean_per_class", "harmonic_mean", "geometric_mean", "top5", "ece",
        "ece_ts")
HEADINGS = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All", "mean_per_class": "mean/class",
            "harmonic_mean": "HM", "geometric_mean": "GM", "top5": "top-5", "ece": "ECE",
            "ece_ts": "ECE after TS"}
LOWER_IS_BETTER = {"ece", "ece_ts"}
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
    from ltcache.core.folders import folder_lock

    path = Path(path)
    root = path if path.is_dir() and path.name != "reports" else (path.parent if path.is_dir() else path.parent.parent)
    with folder_lock(root, shared=True, what="results folder"):
        file = results_file(path)
        results = with_ensemble_rows(read_results_json(file))
    manifest = {}
    from ltcache.cache.results import cache_of_results

    cache = cache_of_results(file)  # from the file's own place, never the current folder
    if cache is not None:
        from ltcache.cache.reader import read_manifest

        try:
            manifest = read_manifest(cache)
        except LtcacheError:
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


EXTRA_ROW_KEYS = ("many", "medium", "few", "all", "mean_per_class", "harmonic_mean", "geometric_mean", "top5")


def with_ensemble_rows(results: dict) -> dict:
    """compare --tta's and --test-prior's accuracies as rows of their own, 'METHOD (K crops)' and 'METHOD (test prior
    P)' after each method's row, so that every table and figure of `ltcache report` shows them beside the balanced
    one-view numbers (compare's own tables give them as columns). Each added row names the method it extends
    (`of`)."""
    rows = []
    for row in results["rows"]:
        rows.append(row)
        tta = row.get("tta")
        for extra, label in ((tta, f"{tta['crops']} crops" if tta else ""),
                             (row.get("test_prior"), f"test prior {(row.get('test_prior') or {}).get('prior')}")):
            if extra:
                rows.append({"method": f"{row['method']} ({label})", "of": row["method"],
                             "chosen": row.get("chosen", {}),
                             **({"task": row["task"]} if "task" in row else {}),
                             **{key: row[key] for key in ("n_many", "n_medium", "n_few") if key in row},
                             **{key: extra[key] for key in EXTRA_ROW_KEYS if key in extra}})
    return {**results, "rows": rows}


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
        curve = row.get("loss_curve")
        if curve is not None and not (isinstance(curve, list) and all(_number(v, optional=False) for v in curve)):
            return f"{where}: 'loss_curve' must be a list of numbers"
        problem = _confusion_problem(row, classes)
        if problem is not None:
            return f"{where}: {problem}"
        bins = row.get("reliability")
        if bins is not None and not (isinstance(bins, list) and all(
                isinstance(b, dict) and _number(b.get("confidence"), optional=False)
                and _number(b.get("accuracy"), optional=False) and ("count" not in b or _count(b["count"]))
                for b in bins)):
            return (f"{where}: 'reliability' must be a list of bins with a confidence, an accuracy and (optional) "
                    "a count of test rows")
        tta = row.get("tta")
        if tta is not None and not (isinstance(tta, dict) and isinstance(tta.get("crops"), int)
                                    and not isinstance(tta["crops"], bool) and tta["crops"] >= 1
                                    and all(_number(tta.get(key)) for key in EXTRA_ROW_KEYS)
                                    and all(key in tta for key in ("many", "medium", "few", "all"))):
            return f"{where}: 'tta' must hold the test-crop accuracies (many, medium, few, all) and 'crops' >= 1"
        shifted = row.get("test_prior")
        if shifted is not None and not (isinstance(shifted, dict) and isinstance(shifted.get("prior"), str)
                                        and isinstance(shifted.get("mode"), str) and _count(shifted.get("rows"))
                                        and all(_number(shifted.get(key)) for key in EXTRA_ROW_KEYS)
                                        and all(key in shifted for key in ("many", "medium", "few", "all"))):
            return f"{where}: 'test_prior' must hold the prior, its mode, the accuracies and the rows counted"
        priors = row.get("shifted_priors")
        if priors is not None and not (isinstance(priors, dict) and all(
                isinstance(k, str) and _number(v, optional=False) for k, v in priors.items())):
            return f"{where}: 'shifted_priors' must map priors to numbers"
    grids = results.get("grids")
    if grids is not None and not (isinstance(grids, list) and all(_grid_point(point) for point in grids)):
        return "'grids' must be a list of grid points with a method, params, a selection score and 'selected'"
    provenance = results.get("provenance") if isinstance(results.get("provenance"), dict) else {}
    names = provenance.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                                  and (classes is None or len(names) == classes)):
        return "provenance 'class_names' must be a list of strings, one per class"
    counted = provenance.get("class_counts")
    if counted is not None and not (isinstance(counted, list) and len(counted) >= 1 and all(map(_count, counted))
                                    and (classes is None or len(counted) == classes)):
        return "provenance 'class_counts' must be a list of non-negative integers, one per class"
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


def _confusion_problem(row: dict, classes: int | None) -> str | None:
    """The first per-class report or confusion field of a row that is not what ltcache writes, or None."""
    for key in ("per_class_precision", "per_class_f1", "per_class_support"):
        values = row.get(key)
        if values is None:
            continue
        check = _count if key.endswith("support") else _number
        if not isinstance(values, list) or not all(map(check, values)):
            return f"{key!r} must be a list of {'counts' if key.endswith('support') else 'numbers'}"
        if classes is not None and len(values) != classes:
            return f"{key!r} has {len(values)} values for {classes} classes"
    pairs = row.get("confused_pairs")
    if pairs is not None and not (isinstance(pairs, list) and all(
            isinstance(p, dict) and all(_count(p.get(k)) for k in ("true", "predicted", "count"))
            and _number(p.get("share"), optional=False)
            and (classes is None or max(p["true"], p["predicted"]) < classes)
            for p in pairs)):
        return "'confused_pairs' must be a list of {true, predicted, count, share} with class indices in range"
    matrix = row.get("confusion")
    if matrix is not None and not (isinstance(matrix, list) and (classes is None or len(matrix) == classes) and all(
            isinstance(line, list) and len(line) == len(matrix) and all(map(_count, line)) for line in matrix)):
        return "'confusion' must be a square list of counts, one row per class"
    return None


def _grid_point(point) -> bool:
    return (isinstance(point, dict) and isinstance(point.get("method"), str) and isinstance(point.get("params"), dict)
            and all(isinstance(k, str) and (_number(v) or isinstance(v, (str, bool)))
                    for k, v in point["params"].items())
            and _number(point.get("selection_mean_per_class"))
            and isinstance(point.get("selected"), bool)
            and (point.get("test") is None or isinstance(point["test"], dict) and all(
                _number(point["test"].get(key)) for key in ("many", "medium", "few", "all", "mean_per_class"))))


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
    seeds = not fields and len(loaded) > 1 and _only_seeds_differ(loaded)
    for index, result in enumerate(loaded):
        if fields:
            result.label = " / ".join(values[f][index] for f in fields)
        else:
            result.label = describe(result) if seeds or len(loaded) == 1 else _folder_name(result.path)
    return loaded


def describe(result: Result) -> str:
    """'fashion-mnist-lt · resnet18': an input's dataset and backbone (else its folder name), for titles and labels."""
    dataset = result.provenance.get("dataset") or (result.manifest.get("dataset") or {}).get("name")
    backbone = result.provenance.get("backbone") or (result.manifest.get("backbone") or {}).get("arch")
    parts = [str(p) for p in (dataset, backbone) if p]
    return " · ".join(parts) if parts else _folder_name(result.path)


def _only_seeds_differ(results: list[Result]) -> bool:
    """Inputs that differ in their seed (stage 1's, else compare's) and in no labelling field: seeds of one
    experiment, to be averaged under one label (never drawn as a variable)."""
    seeds = [result.seed for result in results]
    return None not in seeds and len(set(seeds)) == len(seeds) and len({describe(r) for r in results}) == 1


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
