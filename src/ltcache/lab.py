"""The user-facing stage-2 functions: compare, sweep_tau, info. They read the cache and nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltcache.cache import MANIFEST, FeatureCache, Split
from ltcache.config import COMPARE, SWEEP_TAU, check_thresholds
from ltcache.errors import LtcacheError
from ltcache.folders import folder_lock
from ltcache.heads import Head, LinearHead
from ltcache.metrics import (
    ShotThresholds,
    bootstrap_intervals,
    calibration,
    evaluate,
    fit_temperature,
    per_class_accuracy,
    prior_accuracy,
    shifted_prior_accuracy,
    shifted_priors,
    shot_groups,
    summarize,
)
from ltcache.params import check_all
from ltcache.stage2 import METHODS, PAPER_ORDER, LabData, resolve_params
from ltcache.stage2.weight_norms import DEFAULT_TAUS, best_on_curve, tau_curve, tau_normalize, validate_taus
from ltcache.train import resolve_device


@dataclass
class Lab:
    cache: FeatureCache
    data: LabData
    test: Split

    def score_test(self, head: Head) -> dict:
        return evaluate(head.predict(self.test.features), self.test.labels, self.data.class_counts,
                        self.data.thresholds)

    def score_test_fully(self, head: Head, *, bootstrap: int, seed: int) -> dict:
        """Test metrics, calibration (ECE, raw and after temperature scaling fitted on the selection split) and,
        when bootstrap > 0, 95% intervals: one pass over test."""
        logits = head.logits(self.test.features)
        predictions = logits.argmax(1)
        counts, thresholds = self.data.class_counts, self.data.thresholds
        class_accuracy = per_class_accuracy(predictions, self.test.labels, len(counts))
        overall = 100.0 * (predictions == self.test.labels).double().mean().item()
        result = {**summarize(class_accuracy, overall, counts, thresholds),
                  **calibration(logits, self.test.labels, counts, thresholds),
                  "shifted_priors": shifted_prior_accuracy(class_accuracy, counts)}
        # Calibration after temperature scaling, with T fitted on the selection split (never on test).
        selection = self.data.selection
        temperature = fit_temperature(head.logits(selection.features), selection.labels)
        scaled = calibration(logits, self.test.labels, counts, thresholds, temperature=temperature)
        result["temperature"] = temperature
        result.update({f"{key}_ts": scaled[key] for key in ("ece", "ece_many", "ece_medium", "ece_few")})
        if bootstrap:
            result["ci95"] = bootstrap_intervals(predictions, self.test.labels, counts, thresholds,
                                                 resamples=bootstrap, seed=seed)
        return result


def open_lab(cache_path: Path, *, select: str = "val", seed: int = 0, device: str | None = None,
             thresholds: ShotThresholds = ShotThresholds(), train_views: bool = True) -> Lab:
    """Load train / val / test features (and the augmented train views, if any and wanted) and the joint head
    onto `device` (CUDA when present), every file checked against its sha256 on the way.

    The cache is read under a shared lock: a writer replacing it (extract --overwrite) waits, so the lab never
    holds a mix of two caches. Memory-mapped shards stay valid after a later swap deletes them."""
    run_device = resolve_device(device)
    with folder_lock(Path(cache_path), shared=True, what="cache"):
        cache = FeatureCache(cache_path)
        weight, bias = cache.joint_head()

        def load(name: str) -> Split | None:
            return cache.load_split(name).to(run_device) if cache.has_split(name) else None

        data = LabData(train=load("train"), val=load("val"),
                       joint=LinearHead(weight.to(run_device), bias.to(run_device)), class_counts=cache.class_counts,
                       select=select, seed=seed, thresholds=thresholds,
                       train_views=load("train_views") if train_views else None)
        return Lab(cache, data, cache.load_split("test").to(run_device))


def sweep_tau(cache_path: Path, *, taus=DEFAULT_TAUS, select: str = "val", device: str | None = None,
              thresholds: ShotThresholds = ShotThresholds()) -> dict:
    """Sweep tau on the selection split, choose the best mean per-class accuracy, score test once.

    Returns {"best_tau", "best_score", "selected_on", "curve": [...per tau...], "test": {...}}.
    """
    taus = validate_taus(taus)  # before loading anything: a bad grid fails at once
    check_all(SWEEP_TAU, {"select": select, "many": thresholds.many, "few": thresholds.few})
    check_thresholds(thresholds.many, thresholds.few)
    lab = open_lab(cache_path, select=select, device=device, thresholds=thresholds)
    curve = tau_curve(lab.data, select, taus)
    best = best_on_curve(curve)
    test = lab.score_test(LinearHead(tau_normalize(lab.data.joint.weight, best["tau"])))
    return {"best_tau": best["tau"], "best_score": best["mean_per_class"], "selected_on": select,
            "curve": curve, "test": test}


def compare(cache_path: Path, *, methods: list[str] | None = None, select: str = "val",
            params: dict[str, dict] | None = None, seed: int = 0, device: str | None = None,
            thresholds: ShotThresholds = ShotThresholds(), bootstrap: int = 1000, seeds: int = 1,
            write_reports: bool = True, train_views: bool = True, out: Path | None = None) -> dict:
    """Fit every method on train, select on val (or train), score test once; save heads and reports.

    Each row has the test metrics, ECE (15 bins; overall and per shot group) and, with bootstrap > 0,
    95% percentile intervals from that many resamples of the test samples. With seeds > 1, every stochastic
    method is refitted with seeds seed .. seed+N-1 and the row gains the mean and a 95% t-interval over them.
    Heads and reports go to `out` (default: into the cache), written only once every method has been scored, and
    only if the cache was not replaced meanwhile.
    """
    check_all(COMPARE, {"seed": seed, "bootstrap": bootstrap, "seeds": seeds, "select": select,
                        "many": thresholds.many, "few": thresholds.few})
    check_thresholds(thresholds.many, thresholds.few)
    from ltcache import report  # matplotlib is only needed here

    methods = list(methods or PAPER_ORDER)
    unknown = [m for m in (params or {}) if m not in methods]
    if unknown:
        raise LtcacheError(f"--set names method {unknown[0]!r}, which is not among the methods run "
                           f"({', '.join(methods)})")
    # Resolve every method's hyperparameters first: a bad name or value fails before any head is written.
    resolved = {name: resolve_params(name, (params or {}).get(name)) for name in methods}
    results = Path(out) if out is not None else Path(cache_path)
    if write_reports:
        check_results_folder(results, cache_path)
    lab = open_lab(cache_path, select=select, seed=seed, device=device, thresholds=thresholds,
                   train_views=train_views)
    for name in methods:  # values only the cache can judge, still before any head is written
        if METHODS[name].check is not None:
            METHODS[name].check(resolved[name], lab.data.class_counts)
    rows, fitted = [], {}
    for name in methods:
        start = time.perf_counter()
        result = METHODS[name].fit(lab.data, **resolved[name])
        seconds = time.perf_counter() - start
        # Cached F @ W.T of train (and val) go before scoring: at ImageNet-LT shape the train logits are a third
        # of the cache's size, and a later method that needs them recomputes them in one GEMM.
        lab.data.clear_cached_logits()
        test = lab.score_test_fully(result.head, bootstrap=bootstrap, seed=seed)
        row = {"method": name, **test, "chosen": result.chosen, "fit_seconds": round(seconds, 3)}
        if name == "logit_adj":
            row["shifted_priors_adapted"] = adapted_to_shifted_priors(lab, resolved[name])
        if seeds > 1 and METHODS[name].stochastic:
            row["seeds"] = seed_statistics(lab, name, resolved[name], test, seed=seed, seeds=seeds)
        lab.data.clear_cached_logits()
        rows.append(row)
        fitted[name] = result
    # The tau curve for Fig. 2 (right) is always on the selection split, never on test.
    curve = fitted["tau_norm"].curve if "tau_norm" in fitted else tau_curve(lab.data, select, DEFAULT_TAUS)
    summary = {
        "cache": str(lab.cache.path),
        "cache_generation": lab.cache.generation,
        "selected_on": select,
        "seed": seed,
        "thresholds": {"many": thresholds.many, "few": thresholds.few},
        "bootstrap_resamples": bootstrap,
        "train_views": lab.data.views,  # augmented views per train image the trained heads sampled among (0: none)
        "groups": {g: int((shot_groups(lab.data.class_counts, thresholds) == g).sum())
                   for g in ("many", "medium", "few")},
        "rows": rows,
        "tau_curve": curve,
    }
    if write_reports:
        with results_lock(lab, results):  # heads and reports only for the cache that was read, all or nothing
            for name, result in fitted.items():
                lab.cache.save_head(name, result.head, result.chosen, folder=results / "heads")
            summary["reports"] = report.write_reports(
                results / "reports", summary,
                weight_norms={name: f.head.weight.norm(dim=1).cpu() for name, f in fitted.items()
                              if name in report.NORM_PLOT_METHODS},
                class_counts=lab.data.class_counts,
            )
    return summary


def check_results_folder(results: Path, cache_path: Path) -> None:
    """Before any fit: heads/ and reports/ can be written to `results` (the cache, or compare --out). A folder of
    someone else's files is refused, and a read-only cache is an error that names --out."""
    results = Path(results)
    in_cache = results.resolve() == Path(cache_path).resolve()
    if not in_cache:
        if results.exists() and not results.is_dir():
            raise LtcacheError(f"--out {results} is a file; pass a folder for heads/ and reports/")
        if results.is_dir() and any(results.iterdir()) and not (results / "reports" / "results.json").is_file():
            raise LtcacheError(f"--out {results} holds files that are not an earlier compare's heads/ and reports/; "
                               "pass a new or empty folder")
    probe_root = results if results.is_dir() else next((p for p in results.parents if p.exists()), Path("."))
    probe = probe_root / f".ltcache-write-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        where = f"cache {cache_path}" if in_cache else f"--out {results}"
        hint = "pass --out DIR to write heads and reports elsewhere" if in_cache else "pass a writable folder"
        raise LtcacheError(f"{where} is not writable ({exc.strerror}); {hint}") from None


@contextlib.contextmanager
def results_lock(lab: Lab, results: Path):
    """Write heads and reports under the cache's exclusive lock, and only if the cache at the path is still the one
    that was read (its manifest generation): a cache swapped by extract --overwrite while compare computed gets
    nothing from the old features. With compare --out the results folder is separate and no lock is needed."""
    if results.resolve() != lab.cache.path.resolve():
        results.mkdir(parents=True, exist_ok=True)
        yield
        return
    with folder_lock(lab.cache.path, shared=False, what="cache"):
        try:
            current = json.loads((lab.cache.path / MANIFEST).read_text()).get("generation")
        except (OSError, ValueError, AttributeError):
            current = None
        if current != lab.cache.generation:
            raise LtcacheError(f"cache {lab.cache.path} was replaced by another ltcache process while compare ran; "
                               "nothing was written, re-run compare on the new cache")
        yield


def adapted_to_shifted_priors(lab: Lab, params: dict) -> dict:
    """Logit adjustment aimed at each shifted test prior (tau chosen on the selection split reweighted to that
    prior): its accuracy under the prior, beside `shifted_priors`, where every head stays aimed at balance."""
    raw_test = LinearHead(lab.data.joint.weight).logits(lab.test.features)  # one GEMM; each prior shifts it
    result = {}
    for name, prior in shifted_priors(lab.data.class_counts).items():
        head = METHODS["logit_adj"].fit(lab.data, **{**params, "target": prior}).head
        predictions = (raw_test + head.bias).argmax(1)
        result[name] = prior_accuracy(per_class_accuracy(predictions, lab.test.labels, lab.data.num_classes), prior)
    return result


SEED_KEYS = ("all", "mean_per_class", "many", "medium", "few")


def seed_statistics(lab: Lab, name: str, params: dict, first: dict, *, seed: int, seeds: int) -> dict:
    """Refit `name` with the next seeds-1 seeds; mean and 95% t-interval of each metric over all seeds."""
    from dataclasses import replace

    from scipy import stats

    runs = [first]
    for offset in range(1, seeds):
        refit = METHODS[name].fit(replace(lab.data, seed=seed + offset), **params)
        runs.append(lab.score_test(refit.head))
    half = stats.t.ppf(0.975, seeds - 1)
    summary = {"n": seeds, "seeds": list(range(seed, seed + seeds))}
    for key in SEED_KEYS:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        width = half * values.std(ddof=1) / np.sqrt(seeds)
        summary[key] = {"mean": float(values.mean()), "ci95": [float(values.mean() - width),
                                                             float(values.mean() + width)],
                        "values": values.tolist()}
    return summary


def info(cache_path: Path, *, verify: bool = False) -> dict:
    """A short summary of a cache (its manifest is always checked). With verify, every file is hashed and every
    split and the joint head are read with all their checks: `corrupt_files` lists the files whose sha256 disagrees
    with the manifest, `problems` everything found (empty when the cache is intact)."""
    with folder_lock(Path(cache_path), shared=True, what="cache"):
        cache = FeatureCache(cache_path, verify=False)
        summary = _summary(cache)
        if verify:
            summary["corrupt_files"] = cache.verify()
            summary["problems"] = [f"{name} fails its sha256 check" for name in summary["corrupt_files"]]
            if not summary["problems"]:
                for check in [cache.joint_head, *(lambda n=n: cache.load_split(n) for n in cache.split_names())]:
                    try:
                        check()
                    except LtcacheError as exc:
                        summary["problems"].append(str(exc))
    return summary


def _summary(cache: FeatureCache) -> dict:
    manifest = cache.manifest
    counts = cache.class_counts
    groups = shot_groups(counts)
    summary = {
        "cache": str(cache.path),
        "dataset": manifest["dataset"].get("name"),
        "splits": {name: entry["rows"] for name, entry in manifest["splits"].items()},
        "shards": sum(len(entry["shards"]) for entry in manifest["splits"].values()),
        "feature_dim": cache.feature_dim,
        "dtype": manifest["dtype"],
        "num_classes": cache.num_classes,
        "class_counts_range": [int(counts.min()), int(counts.max())],
        "imbalance_ratio": round(float(counts.max() / max(counts.min(), 1)), 2),
        "groups": {g: int((groups == g).sum()) for g in ("many", "medium", "few")},
        "backbone": manifest["backbone"].get("arch"),
        "checkpoint_sha256": manifest["backbone"].get("checkpoint_sha256"),
        "created": manifest.get("created"),
        "generation": cache.generation,
        "heads": cache.head_names(),
    }
    return summary
