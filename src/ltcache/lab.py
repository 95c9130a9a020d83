"""The classifier lab: open a cache, fit any registered method, score it on test, compare many, write reports.

    lab = open_lab("CACHE", select="val")
    fitted = lab.fit(NAME, **hyperparameters)    # any registered method (ltcache methods lists them)
    result = lab.score(fitted)                   # an Evaluation: result.all, result.few, result.calibration.ece
    comparison = lab.compare([NAME, ...], params={NAME: {KEY: [v1, v2]}})   # a list is a grid

The README's "Python API" section has a worked example.

The lab knows no method by name: everything method-specific (selection curves, plots, extra analyses) comes from
the registry's metadata (stage2/core.py). It reads the cache and nothing else, and imports nothing from stage 1.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ltcache.cache import TEXT_HEAD, FeatureCache, Split
from ltcache.cache.reader import cache_folder
from ltcache.core.console import log as console_log
from ltcache.core.errors import LtcacheError
from ltcache.core.folders import folder_lock
from ltcache.core.options import COMPARE, check_thresholds
from ltcache.core.params import GRID, MAX_GRID_POINTS, check_all
from ltcache.heads import Head
from ltcache.logits import resolve_budget
from ltcache.metrics import Evaluation, GroupAccuracy, ShotThresholds, group_accuracy, shot_groups
from ltcache.stage2.core import (
    METHODS,
    Fitted,
    LabData,
    Method,
    check_data,
    resolve_method_list,
    resolve_params,
    run_fit,
)
from ltcache.stage2.training import fit_points


@dataclass
class GridPoint:
    """One point of a hyperparameter grid: its values, its selection score (mean per-class accuracy on the
    selection split, what the choice uses) and, for the ablation table only, its test accuracy."""

    params: dict
    selection: float
    fit_seconds: float
    selected: bool = False
    test: GroupAccuracy | None = None

    def as_dict(self) -> dict:
        return {"params": self.params, "selection_mean_per_class": self.selection, "selected": self.selected,
                "fit_seconds": round(self.fit_seconds, 3), "test": self.test.as_dict() if self.test else None}


@dataclass
class Row:
    """One method's line in a comparison: its test evaluation, what it chose, and what its metadata adds."""

    method: str
    evaluation: Evaluation
    chosen: dict
    fit_seconds: float
    analyses: dict[str, Any] = field(default_factory=dict)
    seeds: dict | None = None
    grid: list[GridPoint] | None = None
    audit: dict | None = None  # compare --protocol-audit: what choosing on test would have reported
    losses: list[float] | None = None  # a trained head's mean training loss per epoch
    tta: GroupAccuracy | None = None  # compare --tta: test accuracy with the logits averaged over the test crops
    crops: int = 0
    test_prior: dict | None = None  # compare --test-prior: test accuracy under a shifted class prior

    def as_dict(self) -> dict:
        """The row as results.json stores it."""
        row = {"method": self.method, **self.evaluation.as_row(), "chosen": self.chosen,
               "fit_seconds": round(self.fit_seconds, 3), **self.analyses}
        if self.seeds is not None:
            row["seeds"] = self.seeds
        if self.grid is not None:
            row["grid_points"] = len(self.grid)
        if self.audit is not None:
            row["protocol_audit"] = self.audit
        if self.losses:
            row["loss_curve"] = self.losses
        if self.tta is not None:
            row["tta"] = {**self.tta.as_dict(), "crops": self.crops}
        if self.test_prior is not None:
            row["test_prior"] = self.test_prior
        if METHODS[self.method].task is not None:
            row["task"] = METHODS[self.method].task
        return row


@dataclass
class Curve:
    """A selection curve a method contributed (Figure metadata): entries on the selection split, the value chosen."""

    param: str
    title: str
    entries: list[dict]
    chosen: float | None


@dataclass
class Comparison:
    """What `Lab.compare` returns: the rows, the selection curves and the context; `as_dict()` is results.json."""

    cache: str
    cache_generation: str | None
    selected_on: str
    seed: int
    thresholds: ShotThresholds
    bootstrap_resamples: int
    train_views: int
    groups: dict[str, int]
    rows: list[Row]
    curves: dict[str, Curve]
    class_counts: np.ndarray = field(repr=False)
    fitted: dict[str, Fitted] = field(default_factory=dict, repr=False)
    reports: dict[str, str] | None = None
    provenance: dict = field(default_factory=dict, repr=False)  # the cache's dataset, backbone and commands

    def row(self, method: str) -> Row:
        """The row of `method`."""
        for row in self.rows:
            if row.method == method:
                return row
        raise LtcacheError(f"no row {method!r}; the rows are {', '.join(r.method for r in self.rows)}")

    def weight_norms(self) -> dict:
        """Per-class weight norms of the heads whose methods contribute to the weight-norm plot (Fig. 2, left)."""
        return {name: fitted.head.weight.norm(dim=1).cpu().numpy() for name, fitted in self.fitted.items()
                if METHODS[name].weight_norms and hasattr(fitted.head, "weight")}

    def as_dict(self) -> dict:
        summary = {"cache": self.cache, "cache_generation": self.cache_generation, "selected_on": self.selected_on,
                   "seed": self.seed, "thresholds": {"many": self.thresholds.many, "few": self.thresholds.few},
                   "bootstrap_resamples": self.bootstrap_resamples,
                   "train_views": self.train_views,  # augmented views per train image the trained heads used
                   "groups": self.groups, "rows": [row.as_dict() for row in self.rows]}
        summary.update({name: curve.entries for name, curve in self.curves.items()})
        # What `ltcache report` draws without reopening the cache: train counts, weight norms, curves, provenance.
        summary["class_counts"] = [int(n) for n in self.class_counts]
        summary["weight_norms"] = {name: [round(float(v), 6) for v in norms]
                                   for name, norms in self.weight_norms().items()}
        summary["curves"] = {name: {"param": curve.param, "title": curve.title, "chosen": curve.chosen,
                                    "entries": curve.entries} for name, curve in self.curves.items()}
        summary["grids"] = self.ablation()  # every grid point (test scores only under --ablation), for the page
        summary["provenance"] = self.provenance
        if self.reports is not None:
            summary["reports"] = self.reports
        return summary

    def ablation(self) -> list[dict]:
        """Every grid point of every method, selection and test numbers, the selected point marked."""
        return [{"method": row.method, **point.as_dict()} for row in self.rows for point in (row.grid or [])]


@dataclass
class Lab:
    """A cache loaded for stage 2: what methods may see (`data`: train, val, the stage-1 classifier) and test,
    which only `score` reads. Open one with `open_lab`."""

    cache: FeatureCache
    data: LabData
    test: Split
    test_crops: Split | None = None  # K views of every test image, row k * len(test) + i (extract --test-crops)

    @property
    def crops(self) -> int:
        """Views per test image in test_crops (0: none loaded)."""
        return 0 if self.test_crops is None else len(self.test_crops) // len(self.test)

    # ------------------------------------------------------------------------------------------ one method

    def fit(self, method: str, /, **hyperparameters) -> Fitted:
        """Fit registered method `method` with its defaults updated by `hyperparameters` (each checked against
        its declaration). Test is never seen."""
        params = resolve_params(method, hyperparameters)
        self.check(method, params)
        return run_fit(method, self.data, params)

    def score(self, fitted: Fitted | Head, *, bootstrap: int = 0, seed: int | None = None) -> Evaluation:
        """Evaluate a fitted method (or a bare head) on test, once: accuracy and shot groups, calibration raw and
        after temperature scaling (T fitted on the selection split), shifted priors, and with bootstrap > 0 the
        95% intervals of every accuracy."""
        head = fitted.head if isinstance(fitted, Fitted) else fitted
        if not isinstance(head, Head):
            raise LtcacheError(f"score needs a Fitted or a Head, got {type(fitted).__name__}")
        from ltcache.core.distributed import all_reduce_sum, local_rows
        from ltcache.metrics.calibration import fit_temperature
        from ltcache.metrics.evaluation import evaluate_rows, row_statistics

        # One logit matrix alive at a time: the selection split's (for T), then test's. Under torchrun each rank
        # takes its contiguous share of both, T comes from sums over ranks and the row statistics are gathered.
        selection, test = self.data.selection, self.test
        part = local_rows(len(selection))
        temperature = fit_temperature(self.data.logits(head, selection.features[part]), selection.labels[part],
                                      reduce=lambda values: all_reduce_sum(values, test.labels.device))
        part = local_rows(len(test))
        rows = row_statistics(self.data.logits(head, test.features[part]), test.labels[part], temperature)
        return evaluate_rows(rows.gathered(len(test)), test.labels, self.data.class_counts, temperature=temperature,
                             thresholds=self.data.thresholds, bootstrap=bootstrap,
                             seed=self.data.seed if seed is None else seed)

    def score_accuracy(self, head: Head) -> GroupAccuracy:
        """Test accuracy, shot groups and top-5 only (no calibration or intervals)."""
        from ltcache.logits import argmax_rows
        from ltcache.metrics.evaluation import top_k_accuracy

        logits = self.data.logits(head, self.test.features)
        accuracy = group_accuracy(argmax_rows(logits), self.test.labels, self.data.class_counts,
                                  self.data.thresholds)
        return replace(accuracy, top5=top_k_accuracy(logits, self.test.labels, 5))

    def tta_accuracy(self, head: Head) -> GroupAccuracy:
        """Test accuracy, shot groups and top-5 of `head` with its logits averaged over the K test crops (LIFT's
        test-time ensemble: the mean of the crops' logits), a block of test rows at a time within the memory
        budget."""
        import torch

        from ltcache.logits import block_rows
        from ltcache.metrics.evaluation import top_k_accuracy

        if self.test_crops is None:
            raise LtcacheError("this lab has no test crops; open it with tta=True on a cache extracted with "
                               "--test-crops K")
        count, crops, features = len(self.test), self.crops, self.test_crops.features
        rows = max(1, block_rows(head.num_classes, self.data.budget) // max(1, crops))
        predictions, top5_hits = [], 0.0
        for start in range(0, count, rows):
            stop = min(count, start + rows)
            mean = sum(head.logits(features[k * count + start : k * count + stop]) for k in range(crops)) / crops
            predictions.append(mean.argmax(1))
            top5_hits += top_k_accuracy(mean, self.test.labels[start:stop], 5) * (stop - start)
        accuracy = group_accuracy(torch.cat(predictions), self.test.labels, self.data.class_counts,
                                  self.data.thresholds)
        return replace(accuracy, top5=top5_hits / max(1, count))

    def prior_accuracy(self, head: Head, prior, name: str, mode: str = "reweight") -> dict:
        """Test accuracy of `head` if test followed class prior `prior` (metrics.priors.accuracy_under_prior), with
        the prior's name and mode."""
        from ltcache.logits import argmax_rows
        from ltcache.metrics.priors import accuracy_under_prior

        predictions = argmax_rows(self.data.logits(head, self.test.features))
        accuracy = accuracy_under_prior(predictions, self.test.labels, self.data.class_counts, prior, mode=mode,
                                       seed=self.data.seed, thresholds=self.data.thresholds)
        return {"prior": str(name), "mode": mode, **accuracy}

    def check(self, method: str, params: dict) -> None:
        """The values only this cache can judge (a target prior's length, ...), before any fit."""
        entry = METHODS[method]
        check_data(method, self.data)
        if entry.check is not None:
            entry.check(params, self.data.class_counts)

    # ------------------------------------------------------------------------------------------ many methods

    def compare(self, methods: list[str] | str | None = None, *, params: dict[str, dict] | None = None,
                bootstrap: int = 1000, seeds: int = 1, ablation: bool = False, audit: bool = False,
                log: Callable[[str], None] | None = None, loss_curves: bool = False,
                tta: bool = False, test_prior: str | None = None, test_prior_mode: str = "reweight") -> Comparison:
        """Fit every method on train, choose on the selection split, score test once per method.

        `methods`: names, a comma list, 'all', or None for the paper's five. `params`: {method: {key: value}};
        a list for a key that is not itself a list (or command-line text 'a,b,c') is a grid: every point is
        fitted, the one with the best mean per-class accuracy on the selection split is chosen (ties: the first),
        and only it is scored on test as the row. With `ablation`, every point's test accuracy is also recorded
        (after the choice, so it cannot influence it). With seeds > 1, every stochastic method is refitted with
        seeds seed .. seed+N-1 and the row gains the mean and a 95% t-interval. With `audit`, each row also gets
        what the method would report if its choices were made on test (the protocol audit; see `audit`): computed
        after the row is final, it feeds back into nothing. `log` receives progress lines (default: the "ltcache"
        logger at INFO, which a script shows with logging.basicConfig(level=logging.INFO)). With `loss_curves`,
        each trained head's mean loss per epoch is kept (Row.losses; compare --tensorboard writes it); without,
        no loss is read back from the device. With `tta`, each row also gets its test accuracy with the logits
        averaged over the test crops (Row.tta; the lab must hold them: open_lab(tta=True)); every choice stays on the
        one-view selection split. With `test_prior` (a prior spec: forward:F, backward:F, uniform, train or a file),
        each row also gets its test accuracy under that class prior (Row.test_prior; `test_prior_mode` reweight or
        subsample, see metrics.priors.accuracy_under_prior), computed after the row is final."""
        check_all(COMPARE, {"bootstrap": bootstrap, "seeds": seeds, "test_prior_mode": test_prior_mode})
        prior = None
        if test_prior is not None:
            from ltcache.metrics.priors import parse_prior

            prior = parse_prior(test_prior, self.data.class_counts)
        if tta and self.test_crops is None:
            raise LtcacheError("--tta needs the cache's test crops; extract with --test-crops K (2, 5 or 10)")
        names = resolve_method_list(methods)
        if isinstance(methods, str) and methods.strip() == "all" and self.data.text is None:
            names = [name for name in names if not METHODS[name].text]  # no text head: the text methods sit out
        grids = expand_grids(names, params)
        for name in names:
            for point in grids[name]:
                self.check(name, point)
        log = log or console_log  # the "ltcache" logger: silent in a script unless logging is configured
        rows, fitted = [], {}
        for index, name in enumerate(names, 1):
            log(f"[{index}/{len(names)}] {name}: fitting" + (f" {len(grids[name])} grid points" if len(grids[name]) > 1
                                                              else ""))
            start = time.perf_counter()
            result, chosen_params, points = self._fit_grid(name, grids[name], ablation=ablation,
                                                           loss_curves=loss_curves)
            seconds = time.perf_counter() - start
            # Cached F @ W.T of train (and val) go before scoring: at ImageNet-LT shape the train logits are a third
            # of the cache's size, and a later method that needs them recomputes them in one GEMM.
            self.data.clear_cached_logits()
            evaluation = self.score(result, bootstrap=bootstrap, seed=self.data.seed)
            entry = METHODS[name]
            row = Row(name, evaluation, result.chosen, seconds,
                      analyses={key: analysis(self.data, self.test, chosen_params)
                                for key, analysis in entry.analyses.items()},
                      grid=points, losses=result.losses)
            if seeds > 1 and entry.stochastic:
                row.seeds = self._seed_statistics(name, chosen_params, evaluation, seeds=seeds)
            if audit:
                row.audit = self.audit(name, grids[name], evaluation.accuracy)
            if tta:
                row.tta, row.crops = self.tta_accuracy(result.head), self.crops
            if prior is not None:
                row.test_prior = self.prior_accuracy(result.head, prior, test_prior, test_prior_mode)
            self.data.clear_cached_logits()
            rows.append(row)
            fitted[name] = result
            log(f"[{index}/{len(names)}] {name}: done in {time.perf_counter() - start:.1f} s "
                f"(test mean/class {evaluation.mean_per_class:.2f})")
        return Comparison(
            cache=str(self.cache.path), cache_generation=self.cache.generation, selected_on=self.data.select,
            seed=self.data.seed, thresholds=self.data.thresholds, bootstrap_resamples=bootstrap,
            train_views=self.data.views, groups=group_sizes(self.data.class_counts, self.data.thresholds), rows=rows,
            curves=self._curves(rows, fitted), class_counts=np.asarray(self.data.class_counts), fitted=fitted,
            provenance=provenance(self.cache))

    def audit(self, name: str, grid: list[dict], honest: GroupAccuracy) -> dict:
        """The protocol audit of one method: refit it with test in the place of the selection split, so that every
        choice it makes (a tau, a grid point, a norm cap) is made on test, as the official tau sweep script and several
        stage-2 "best epoch" loops effectively do, and score that on test. `optimism` is how much the test-chosen
        number exceeds the honest one (`honest`, chosen on the selection split). Read only for the report."""
        # test in the place of the selection split, and every choice labelled selected_on: test
        oracle = replace(self.data, val=self.test, select="val", selection_name="test", _raw_logits={})
        result, _, _ = self._fit_grid(name, grid, ablation=False, data=oracle)
        chosen = self.score_accuracy(result.head)
        return {"chosen_on_test": result.chosen,
                "test_if_chosen_on_test": chosen.as_dict(),
                "optimism_mean_per_class": chosen.mean_per_class - honest.mean_per_class,
                "optimism_all": chosen.all - honest.all}

    def _fit_grid(self, name: str, grid: list[dict], *, ablation: bool, loss_curves: bool = False,
                  data: LabData | None = None) -> tuple[Fitted, dict, list[GridPoint] | None]:
        """Fit every point; choose on the selection split only. Test is read only after the choice (ablation).
        A trained method's points train together, in one pass per group of points that draw the same batches
        (stage2/training.py); each point's fit_seconds is then its share of its pass."""
        data = data if data is not None else self.data
        if len(grid) == 1:
            return _fit(name, data, grid[0], loss_curves), grid[0], None
        varying = [key for key in grid[0] if any(point[key] != grid[0][key] for point in grid)]
        if METHODS[name].plan is not None:
            start = time.perf_counter()
            results = fit_points(name, [(data, values) for values in grid], loss_curves=loss_curves)
            shares = [(time.perf_counter() - start) / len(grid)] * len(grid)
        else:
            results, shares = [], []
            for values in grid:
                start = time.perf_counter()
                results.append(_fit(name, data, values, loss_curves))
                shares.append(time.perf_counter() - start)
                data.clear_cached_logits()
        points = []
        for values, result, seconds in zip(grid, results, shares, strict=True):
            points.append(GridPoint({key: values[key] for key in varying}, data.selection_score(result.head),
                                    seconds))
        data.clear_cached_logits()
        best = max(range(len(points)), key=lambda i: (points[i].selection, -i))
        points[best].selected = True
        if ablation:  # after the choice: these numbers cannot influence it
            for point, result in zip(points, results, strict=True):
                point.test = self.score_accuracy(result.head)
        chosen = results[best]
        chosen.chosen = {**chosen.chosen, "grid": {**points[best].params, "points": len(points),
                                                   "selected_on": data.selected_on,
                                                   "selection_mean_per_class": round(points[best].selection, 4)}}
        return chosen, grid[best], points

    def _curves(self, rows: list[Row], fitted: dict[str, Fitted]) -> dict[str, Curve]:
        curves: dict[str, Curve] = {}
        chosen = {row.method: row.chosen for row in rows}
        for name, entry in METHODS.items():
            for figure in entry.figures:
                if figure.name in curves or (name not in fitted and not figure.always):
                    continue
                curves[figure.name] = Curve(figure.param, figure.title, figure.compute(self.data, fitted.get(name)),
                                            chosen.get(name, {}).get(figure.param))
        return curves

    def _seed_statistics(self, name: str, params: dict, first: Evaluation, *, seeds: int) -> dict:
        """Refit `name` with the next seeds-1 seeds; mean and 95% t-interval of each metric over all seeds."""
        from ltcache.report.stats import t_interval

        seed = self.data.seed
        # a trained method's replicates train in one pass, one stream of draws per seed (stage2/training.py)
        refits = fit_points(name, [(replace(self.data, seed=seed + offset), params) for offset in range(1, seeds)])
        self.data.clear_cached_logits()
        runs = [first.accuracy] + [self.score_accuracy(refit.head) for refit in refits]
        summary: dict[str, Any] = {"n": seeds, "seeds": list(range(seed, seed + seeds))}
        for key in SEED_KEYS:
            values = [float(getattr(run, key)) for run in runs]
            mean, low, high = t_interval(values)
            summary[key] = {"mean": mean, "ci95": [low, high], "values": values}
        return summary

    # ------------------------------------------------------------------------------------------ writing

    def save(self, comparison: Comparison, out: Path | None = None, *, ablation: bool = False,
             tensorboard: bool = False) -> dict[str, str]:
        """Write every fitted head to OUT/heads and the reports to OUT/reports (OUT: the cache by default), built
        whole beside them and published at once under the folder's lock, only if the cache at the path is still the
        one that was read. An earlier comparison there moves to OUT/history/STAMP (results_folder.py). Returns the
        report paths."""
        from ltcache.cache.results import check_results_folder, publish, results_lock, staging
        from ltcache.report import write_reports  # matplotlib is only needed here

        results = Path(out) if out is not None else self.cache.path
        check_results_folder(results, self.cache.path)
        in_cache = results.resolve() == self.cache.path.resolve()
        with staging(results) as staged:
            for name, result in comparison.fitted.items():
                self.cache.save_head(name, result.head, result.chosen, folder=staged / "heads")
            written = write_reports(staged / "reports", comparison.as_dict(),
                                    ablation=comparison.ablation() if ablation else None, shown_as=results / "reports")
            if tensorboard:
                write_events(staged / "tensorboard", comparison)
            with results_lock(results, cache_path=self.cache.path, generation=self.cache.generation,
                              in_cache=in_cache):
                archived = publish(results, staged, cache_path=self.cache.path, in_cache=in_cache)
        comparison.reports = {name: str(results / "reports" / Path(path).name) for name, path in written.items()}
        if archived is not None:
            comparison.reports["earlier"] = str(archived)
        return comparison.reports


def write_events(folder: Path, comparison: Comparison) -> None:
    """compare --tensorboard: under `folder`, one run per method (folder/METHOD) holding its row as hparams (the
    method and every scalar it chose) with its test metrics, and its training loss per epoch as loss/METHOD."""
    from ltcache.core.tensorboard import summary_writer

    writer = summary_writer(folder)
    try:
        for row in comparison.rows:
            hparams = {"method": row.method, **_scalars(row.chosen)}
            accuracy = row.evaluation.accuracy.as_dict()
            metrics = {f"test/{key}": float(accuracy[key]) for key in ("all", "mean_per_class", "many", "medium",
                                                                      "few") if accuracy[key] == accuracy[key]}
            metrics["test/ece"] = float(row.evaluation.calibration.ece)
            writer.add_hparams(hparams, metrics, run_name=row.method)
            for epoch, loss in enumerate(row.losses or [], 1):
                writer.add_scalar(f"loss/{row.method}", loss, epoch)
    finally:
        writer.close()


def _scalars(values: dict, prefix: str = "") -> dict:
    """The int / float / str / bool leaves of a nested dict, keys joined with dots (TensorBoard's hparams types)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
    return flat


def _fit(name: str, data, values: dict, loss_curves: bool) -> Fitted:
    """run_fit; with `loss_curves`, the head's training loss per epoch kept on the result (Fitted.losses; None for an
    untrained one)."""
    if METHODS[name].plan is not None:
        return fit_points(name, [(data, values)], loss_curves=loss_curves)[0]
    if not loss_curves:
        return run_fit(name, data, values)
    from ltcache.fitting import recording_losses

    with recording_losses() as losses:
        result = run_fit(name, data, values)
    result.losses = [round(v, 6) for v in losses] or None
    return result


def _silent(message: str) -> None:
    """Another rank's progress lines: rank 0 tells them."""


SEED_KEYS = ("all", "mean_per_class", "many", "medium", "few")


def provenance(cache: FeatureCache) -> dict:
    """Where a comparison's numbers come from: the cache's dataset, class counts, backbone (checkpoint sha256, its
    training config and command line), the extract command and versions, and this process's command line."""
    from ltcache._version import __version__
    from ltcache.core.distributed import get_world_size
    from ltcache.core.runtime import command_line

    manifest = cache.manifest
    backbone = manifest.get("backbone", {})
    config = backbone.get("resolved_config") or {}
    return {"dataset": manifest.get("dataset", {}).get("name"), "class_names": manifest.get("class_names"),
            "class_counts": manifest.get("class_counts"), "backbone": backbone.get("arch"),
            "checkpoint_sha256": backbone.get("checkpoint_sha256"), "checkpoint_format": backbone.get(
                "checkpoint_format", "ltcache-checkpoint"), "stage1_sampler": config.get("sampler"),
            "stage1_seed": config.get("seed"), "stage1_epochs": config.get("epochs"),
            "train_command": config.get("command"), "extract_command": backbone.get("command"),
            "cache_ltcache_version": manifest.get("ltcache_version"), "cache_created": manifest.get("created"),
            "ltcache_version": __version__, "compare_command": command_line(),
            "processes": get_world_size()}  # torchrun processes that shared the stage-2 work


def group_sizes(class_counts, thresholds: ShotThresholds) -> dict[str, int]:
    groups = shot_groups(class_counts, thresholds)
    return {g: int((groups == g).sum()) for g in ("many", "medium", "few")}


def expand_grids(methods: list[str], params: dict[str, dict] | None) -> dict[str, list[dict]]:
    """Each method's resolved hyperparameters, one dict per grid point. A value is a grid when it is a list or
    tuple for a key whose declared type is not itself a list, or command-line text with commas ('0.05,0.1')
    for such a key; a list-typed key (a tau grid) keeps its list. Every point is checked against the
    declarations before anything is fitted, and a grid of more than MAX_GRID_POINTS points is refused."""
    params = params or {}
    unknown = [m for m in params if m not in methods]
    if unknown:
        raise LtcacheError(f"--set names method {unknown[0]!r}, which is not among the methods run "
                           f"({', '.join(methods)})")
    grids = {}
    for name in methods:
        overrides = params.get(name) or {}
        declared = {p.name: p for p in METHODS[name].params}
        axes: dict[str, list] = {}
        for key, value in overrides.items():
            param = declared.get(key)
            if param is None or param.type in (GRID, list):
                axes[key] = [value]
            elif isinstance(value, str) and "," in value:
                axes[key] = [part.strip() for part in value.split(",")]
                if any(not part for part in axes[key]):
                    raise LtcacheError(f"--set {name}.{key}={value}: a grid is values separated by commas, "
                                       "e.g. 0.05,0.1,0.2")
            elif isinstance(value, (list, tuple)):
                if not value:
                    raise LtcacheError(f"{name}.{key}: the grid is empty; give at least one value")
                axes[key] = list(value)
            else:
                axes[key] = [value]
        size = int(np.prod([len(values) for values in axes.values()])) if axes else 1
        if size > MAX_GRID_POINTS:
            raise LtcacheError(f"the grid of {name} has {size:,} points, more than {MAX_GRID_POINTS:,}; use fewer "
                               "values")
        keys = list(axes)
        grids[name] = [resolve_params(name, dict(zip(keys, combination, strict=True)))
                       for combination in itertools.product(*(axes[key] for key in keys))]
    return grids


TTA_NEEDS_CROPS = ("--tta needs test crops, which {cache} lacks; extract with --test-crops K (2: the view and its "
                   "mirror, 5 or 10: five / ten crops)")


def open_lab(cache_path: Path | str, *, select: str = "val", seed: int = 0, device: str | None = None,
             thresholds: ShotThresholds = ShotThresholds(), train_views: bool = True,
             memory_budget: str | int | None = None, precision: str = "float32", tta: bool = False) -> Lab:
    """Load train / val / test features (and the augmented train views, if any and wanted) and the stage-1
    classifier onto `device` (CUDA when present), every file checked against its sha256 on the way.

    With `tta`, the test crops (extract --test-crops) are loaded too, for Lab.tta_accuracy and compare --tta.
    `memory_budget` ('2G', bytes, or None for a quarter of the machine's RAM, or of the GPU's memory on CUDA) is
    the most one split's logits may take whole; beyond it methods and scoring compute them in row blocks (logits.py).
    `cache_path` may also be the cache's manifest.json. `precision` bf16 trains the learned heads with bfloat16
    products (float32 weights; every score stays float32).

    The cache is read under a shared lock: a writer replacing it (extract --overwrite) waits, so the lab never
    holds a mix of two caches. Memory-mapped shards stay valid after a later swap deletes them."""
    cache_path = cache_folder(cache_path)
    from ltcache.core.runtime import resolve_device
    from ltcache.heads import LinearHead

    check_all(COMPARE, {"select": select, "seed": seed, "many": thresholds.many, "few": thresholds.few,
                        "precision": precision})
    check_thresholds(thresholds.many, thresholds.few)
    run_device = resolve_device(device)
    budget = resolve_budget(memory_budget, run_device)
    with folder_lock(Path(cache_path), shared=True, what="cache"):
        cache = FeatureCache(cache_path)
        weight, bias = cache.joint_head()

        def load(name: str) -> Split | None:
            return cache.load_split(name).to(run_device) if cache.has_split(name) else None

        stage1 = LinearHead(weight.to(run_device), bias.to(run_device))
        text = cache.text_head()
        data = LabData(load("train"), load("val"), stage1, cache.class_counts, select=select, seed=seed,
                       thresholds=thresholds, train_views=load("train_views") if train_views else None,
                       memory_budget=budget, text=text.to(run_device) if text is not None else None,
                       precision=precision)
        crops = None
        if tta:
            if not cache.has_split("test_crops"):
                raise LtcacheError(TTA_NEEDS_CROPS.format(cache=cache_path))
            crops = load("test_crops")
        return Lab(cache, data, cache.load_split("test").to(run_device), crops)


def compare(cache_path: Path, *, methods: list[str] | str | None = None, select: str = "val",
            params: dict[str, dict] | None = None, seed: int = 0, device: str | None = None,
            thresholds: ShotThresholds = ShotThresholds(), bootstrap: int = 1000, seeds: int = 1,
            write_reports: bool = True, train_views: bool = True, out: Path | None = None, ablation: bool = False,
            protocol_audit: bool = False, memory_budget: str | int | None = None,
            log: Callable[[str], None] | None = None, tensorboard: bool = False,
            precision: str = "float32", tta: bool = False, test_prior: str | None = None,
            test_prior_mode: str = "reweight") -> Comparison:
    """`ltcache compare`: open the cache, `Lab.compare`, and write heads and reports to `out` (default: into the
    cache) once every method has been scored, only if the cache was not replaced meanwhile.

    Every argument is checked, every method name and hyperparameter resolved (grids included) and the results
    folder probed before any feature is loaded."""
    cache_path = cache_folder(cache_path)
    check_all(COMPARE, {"seed": seed, "bootstrap": bootstrap, "seeds": seeds, "select": select,
                        "many": thresholds.many, "few": thresholds.few, "precision": precision,
                        "test_prior_mode": test_prior_mode})
    check_thresholds(thresholds.many, thresholds.few)
    names = resolve_method_list(methods)
    expand_grids(names, params)  # a bad name, value or grid fails before anything is loaded
    resolve_budget(memory_budget)
    if tta or test_prior is not None:  # judged from the manifest, before any feature is loaded
        from ltcache.cache.reader import read_manifest
        from ltcache.metrics.priors import parse_prior

        manifest = read_manifest(cache_path)
        if tta and "test_crops" not in manifest["splits"]:
            raise LtcacheError(TTA_NEEDS_CROPS.format(cache=cache_path))
        if test_prior is not None:
            parse_prior(test_prior, manifest["class_counts"])
    if tensorboard:
        from ltcache.core.tensorboard import require_tensorboard

        require_tensorboard()
    results = Path(out) if out is not None else Path(cache_path)
    if write_reports:
        from ltcache.cache.results import check_results_folder

        check_results_folder(results, cache_path)
    from ltcache.core.distributed import barrier, is_main_process, process_group
    from ltcache.core.runtime import resolve_device

    # Under torchrun: trained heads draw the same batches on every rank, each rank computing its own rows, and
    # scoring splits test and the selection split across ranks (see training.py and Lab.score); rank 0 writes.
    with process_group(resolve_device(device)):
        lab = open_lab(cache_path, select=select, seed=seed, device=device, thresholds=thresholds,
                       train_views=train_views, memory_budget=memory_budget, precision=precision, tta=tta)
        comparison = lab.compare(methods if isinstance(methods, str) else names, params=params,  # 'all' stays 'all'
                                 bootstrap=bootstrap, seeds=seeds, ablation=ablation, audit=protocol_audit,
                                 log=log if is_main_process() else _silent, loss_curves=tensorboard, tta=tta,
                                 test_prior=test_prior, test_prior_mode=test_prior_mode)
        if write_reports and is_main_process():
            lab.save(comparison, out, ablation=ablation, tensorboard=tensorboard)
        barrier()
    return comparison


@dataclass(frozen=True)
class TauSweep:
    """What `ltcache sweep-tau` found: the curve on the selection split, the chosen tau and its test accuracy."""

    method: str
    best_tau: float
    best_score: float
    selected_on: str
    curve: list[dict]
    test: GroupAccuracy

    def as_dict(self) -> dict:
        return {**asdict(self), "test": self.test.as_dict()}


def sweep_tau(cache_path: Path | str, *, taus: tuple[float, ...] | None = None, select: str = "val",
              device: str | None = None, thresholds: ShotThresholds | None = None,
              memory_budget: str | int | None = None, precision: str = "float32") -> TauSweep:
    """`ltcache sweep-tau`: the tau curve on the selection split, the best mean per-class accuracy chosen, test
    scored once at that tau.

    It reads only what it uses: the manifest, the stage-1 classifier, the selection split and test (never train with
    --select val), each file hashed and checked as it is read. On the CPU in float32 it runs on numpy alone, without
    importing torch; `precision` bf16, or a GPU, computes the two products with torch (logits.matrix_product)."""
    from ltcache.core.runtime import cpu_without_torch
    from ltcache.logits import matrix_product
    from ltcache.stage2.methods.weight_norms import DEFAULT_TAUS, TAU_NORM, sweep_tau_arrays, validate_taus

    cache_path = cache_folder(cache_path)
    taus = validate_taus(DEFAULT_TAUS if taus is None else taus)  # before loading anything: a bad grid fails at once
    thresholds = thresholds or ShotThresholds()
    check_all(COMPARE, {"select": select, "many": thresholds.many, "few": thresholds.few, "precision": precision})
    check_thresholds(thresholds.many, thresholds.few)
    run_device = None
    if not (precision == "float32" and cpu_without_torch(device)):
        from ltcache.core.runtime import resolve_device

        run_device = resolve_device(device)
    budget = resolve_budget(memory_budget, run_device)
    with folder_lock(Path(cache_path), shared=True, what="cache"):
        cache = FeatureCache(cache_path)
        if select == "val" and not cache.has_split("val"):
            raise LtcacheError("the cache has no val split to select on; pass --select train")
        weight, _ = cache.joint_arrays()
        selection, test = cache.read_split(select), cache.read_split("test")
        curve, best, accuracy = sweep_tau_arrays(selection, test, weight, cache.class_counts, taus,
                                                 thresholds=thresholds, budget=budget,
                                                 product=matrix_product(precision, run_device))
    return TauSweep(TAU_NORM, best["tau"], best["mean_per_class"], select, curve, accuracy)


def info(cache_path: Path, *, verify: bool = False) -> dict:
    """A short summary of a cache (its manifest is always checked). With verify, every file is hashed and every
    split and the stage-1 classifier are read with all their checks: `corrupt_files` lists the files whose sha256
    disagrees with the manifest, `problems` everything found (empty when the cache is intact). Without verify, no
    torch is imported."""
    cache_path = cache_folder(cache_path)
    with folder_lock(Path(cache_path), shared=True, what="cache"):
        cache = FeatureCache(cache_path, verify=False)
        summary = _summary(cache)
        if verify:
            summary["corrupt_files"] = cache.verify()
            summary["problems"] = [f"{name} fails its sha256 check" for name in summary["corrupt_files"]]
            if not summary["problems"]:
                for check in [cache.joint_head, cache.text_head,
                              *(lambda n=n: cache.load_split(n) for n in cache.split_names())]:
                    try:
                        check()
                    except LtcacheError as exc:
                        summary["problems"].append(str(exc))
            summary["unlisted_files"] = cache.unlisted()
            summary["problems"] += [f"{name} is in the cache but not in its manifest (left over, or put there by "
                                    "something else; move it out)" for name in summary["unlisted_files"]]
    return summary


def _extraction_options(manifest: dict) -> dict:
    """What extract's feature and crop options recorded (absent from a cache made without them)."""
    model = manifest["backbone"].get("model")
    options = {}
    if isinstance(model, dict) and isinstance(model.get("features"), dict):
        options["features"] = model["features"].get("kind")
    crops = manifest.get("test_crops")
    if isinstance(crops, dict):
        options["test_crops"] = f"{crops.get('count')} ({crops.get('geometry')})"
    return options


def _summary(cache: FeatureCache) -> dict:
    manifest = cache.manifest
    counts = cache.class_counts
    return {
        "cache": str(cache.path),
        "dataset": manifest["dataset"].get("name"),
        "splits": {name: entry["rows"] for name, entry in manifest["splits"].items()},
        "shards": sum(len(entry["shards"]) for entry in manifest["splits"].values()),
        "feature_dim": cache.feature_dim,
        "dtype": manifest["dtype"],
        "num_classes": cache.num_classes,
        "class_counts_range": [int(counts.min()), int(counts.max())],
        "imbalance_ratio": round(float(counts.max() / max(counts.min(), 1)), 2),
        "groups": group_sizes(counts, ShotThresholds()),
        "backbone": manifest["backbone"].get("arch"),
        "checkpoint_sha256": manifest["backbone"].get("checkpoint_sha256"),
        **({"weights": manifest["backbone"]["model"].get("weights")}  # extracted as it is: no checkpoint
           if isinstance(manifest["backbone"].get("model"), dict) else {}),
        **_extraction_options(manifest),
        "zero_shot_head": TEXT_HEAD in manifest.get("files", {}),
        "created": manifest.get("created"),
        "generation": cache.generation,
        "heads": cache.head_names(),
    }


__all__ = ["Comparison", "Curve", "GridPoint", "Lab", "Method", "Row", "compare", "expand_grids", "info", "open_lab"]
