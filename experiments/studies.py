"""The paper's studies, one command each, driving ltcache's own API: train, extract, compare, report.

    python experiments/studies.py STUDY [STUDY ...] --recipe experiments/fashion_mnist_lt.toml --out studies/fmnist

STUDY is one of
  samplers          Figure 1 / Table 5: the 4 stage-1 samplers x {joint, NCM, cRT, tau-norm, LWS}
  finetune          Table 1: joint, B+C, B+C at 0.1x lr, LB+C (train-backbone --init), and cRT (C)
  tau               Table 9: tau chosen on val, on the simulated-balanced train set, or learned
  sampling-weights  Figure 3: the samplers' class probabilities p_j (and over epochs, progressive)
  mlp               Table 10: 1-, 2- and 3-layer classifiers re-trained on the frozen features
  findings          the paper's four findings tested on the runs above (paired differences over seeds)
  all               every study above

Every study runs each of --seeds end to end (a seed is a whole replicate: split, stage 1 and stage 2) and reports the
mean and 95% t-interval over seeds. What already exists is skipped (a finished run, a cache of that checkpoint, a
comparison of that cache) and a killed run is resumed, so a rerun picks up where the last one stopped. Each study
writes OUT/STUDY.md (its table), OUT/reports/STUDY/index.html (`ltcache report` over its results) and OUT/STUDY.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SAMPLERS = ("instance", "class", "sqrt", "progressive")
PAPER_FIVE = ("joint", "ncm", "crt", "tau_norm", "lws")
STUDIES = ("samplers", "finetune", "tau", "sampling-weights", "mlp", "findings")
# The last block ("LB" of Table 1) of each backbone family: the parameter groups train-backbone --trainable takes.
LAST_BLOCK = {"smallresnet8": "stages.2", "smallresnet14": "stages.4,stages.5", "resnet32": "stages.10,stages.11,"
              "stages.12,stages.13,stages.14", "resnet": "layer4", "resnext": "layer4"}


def log(message: str) -> None:
    print(f"[studies {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Study:
    """The shared steps: a run per (variant, seed), its cache, and comparisons of the cache, each skipped when done."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ steps

    def run(self, name: str, seed: int, **overrides) -> Path:
        """Train (or resume, or skip) runs/NAME-seedS from the recipe with `overrides`."""
        from ltcache.checkpoint import load_checkpoint
        from ltcache.config import train_config_from
        from ltcache.train import fit, resume

        folder = self.out / "runs" / f"{name}-seed{seed}"
        values = {"out": str(folder), "seed": seed, "device": self.args.device, **overrides}
        if self.args.epochs and "epochs" not in overrides:
            values["epochs"] = self.args.epochs
        if self.args.root:
            values["root"] = self.args.root
        cfg = train_config_from(values, explicit=set(values), recipe=Path(self.args.recipe))
        if (folder / "checkpoint.pt").is_file():
            state = load_checkpoint(folder / "checkpoint.pt")
            wanted, saved = cfg.resolved(), state["config"]
            for key in ("sampler", "seed", "epochs", "backbone", "batch_size", "lr", "trainable", "init"):
                if key == "init" and saved.get(key) and getattr(wanted, key):
                    same = Path(saved[key]).resolve() == Path(getattr(wanted, key)).resolve()
                else:
                    same = saved.get(key) == getattr(wanted, key)
                if not same:
                    raise SystemExit(f"error: {folder} was trained with {key} = {saved.get(key)!r}, this study asks "
                                     f"for {getattr(wanted, key)!r}; pass another --out, or remove that run")
            if state["epoch"] >= cfg.epochs:
                return folder
            log(f"resuming {folder} at epoch {state['epoch'] + 1}")
            return self._timed(f"train {folder.name}", resume, folder, device=self.args.device)
        log(f"training {folder.name}")
        return self._timed(f"train {folder.name}", fit, cfg)

    def cache(self, run: Path) -> Path:
        """Extract the run's checkpoint into caches/RUN, unless a cache of that very checkpoint is there."""
        from ltcache.extract import extract
        from ltcache.fsutil import sha256_file

        cache = self.out / "caches" / run.name
        manifest = cache / "manifest.json"
        if manifest.is_file():
            made_from = json.loads(manifest.read_text())["backbone"].get("checkpoint_sha256")
            if made_from == sha256_file(run / "checkpoint.pt"):
                return cache
        log(f"extracting {run.name}")
        return self._timed(f"extract {run.name}", extract, run / "checkpoint.pt", cache, device=self.args.device,
                           overwrite=cache.exists())

    def compare(self, cache: Path, study: str, methods, *, select: str = "val", seed: int = 0) -> Path:
        """Compare `methods` on the cache into results/STUDY/CACHE[-select] (its own heads/ and reports/), unless a
        comparison of this cache generation with these methods is there."""
        from ltcache.lab import compare

        results = self.out / "results" / study / (cache.name + ("" if select == "val" else f"-{select}"))
        done = results / "reports" / "results.json"
        generation = json.loads((cache / "manifest.json").read_text()).get("generation")
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("cache_generation") == generation and [r["method"] for r in saved["rows"]] == list(methods):
                return results
        log(f"comparing {', '.join(methods)} on {cache.name} (select {select})")
        self._timed(f"compare {study} {results.name}", compare, cache, methods=list(methods), select=select, seed=seed,
                    out=results, device=self.args.device, bootstrap=self.args.bootstrap)
        return results

    def report(self, study: str, results: list[Path], *, by: str | None = None, title: str,
               labels: list[str] | None = None) -> Path:
        from ltcache.htmlreport import build_report

        out = self.out / "reports" / study
        log(f"report {out}")
        self._timed(f"report {study}", build_report, results, out, by=by, title=title, overwrite=True,
                    labels=labels)
        return out / "index.html"

    def _timed(self, label: str, fn, *args, **kwargs):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[label] = round(time.perf_counter() - begin, 1)
        return result

    def write(self, study: str, markdown: str, data: dict) -> None:
        from ltcache.fsutil import atomic_write, write_json

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / f"{study}.md", lambda tmp: tmp.write_text(markdown))
        write_json(self.out / f"{study}.json", data)
        log(f"wrote {self.out / f'{study}.md'}")

    # ------------------------------------------------------------------------------------------------ studies

    def instance_caches(self) -> list[tuple[int, Path]]:
        return [(seed, self.cache(self.run("instance", seed, sampler="instance"))) for seed in self.args.seeds]

    def samplers(self) -> None:
        results = []
        for seed in self.args.seeds:
            for sampler in SAMPLERS:
                cache = self.cache(self.run(sampler, seed, sampler=sampler))
                results.append(self.compare(cache, "samplers", PAPER_FIVE, seed=seed))
        from ltcache.htmlreport import aggregate_rows, load_results, summary_table
        page = self.report("samplers", results, by="backbone.resolved_config.sampler",
                           title="Figure 1 / Table 5: stage-1 sampler x classifier")
        loaded = load_results(results, by="backbone.resolved_config.sampler")
        table = aggregate_rows(loaded)
        markdown = ("### Figure 1 / Table 5: stage-1 sampler x classifier\n\n"
                    f"Mean over seeds {_seeds(self.args.seeds)} with 95% t-intervals; report: `{page}`.\n\n"
                    + summary_table(table, label="sampler") + "\n")
        self.write("samplers", markdown, {"rows": table, "timings": self.timings})

    def finetune(self) -> None:
        variants = {}
        for seed, cache in self.instance_caches():
            run = self.out / "runs" / f"instance-seed{seed}"
            config = json.loads((run / "config.json").read_text())["config"]
            arch, lr = config["backbone"], float(config["lr"])
            family = next((key for key in LAST_BLOCK if arch.startswith(key)), None)
            if family is None:
                raise SystemExit(f"error: no last block known for backbone {arch}; add it to LAST_BLOCK")
            common = {"init": str(run / "checkpoint.pt"), "sampler": "class", "epochs": self.args.finetune_epochs}
            plan = {"B+C": ("ft-bc", {}), "B+C (0.1x lr)": ("ft-bc-lr0.1", {"lr": lr * 0.1}),
                    "LB+C": ("ft-lbc", {"trainable": LAST_BLOCK[family] + ",fc"})}
            base = self.compare(cache, "finetune", ("joint", "crt"), seed=seed)
            variants.setdefault("Joint", []).append(("joint", base))
            variants.setdefault("C (cRT)", []).append(("crt", base))
            for label, (name, overrides) in plan.items():
                tuned = self.cache(self.run(name, seed, **common, **overrides))
                variants.setdefault(label, []).append(("joint", self.compare(tuned, "finetune", ("joint",), seed=seed)))
        from ltcache.htmlreport import aggregate_rows, load_results, summary_table
        named = {}  # each results folder once, under the name of the variant that made it
        for label, entries in variants.items():
            for _, path in entries:
                named.setdefault(path, "frozen (joint, cRT)" if label in ("Joint", "C (cRT)") else label)
        page = self.report("finetune", list(named), labels=list(named.values()),
                           title="Table 1: re-training / fine-tuning parts")
        table = {}
        for label, entries in variants.items():
            loaded = load_results([path for _, path in entries])
            method = entries[0][0]
            table[label] = aggregate_rows(loaded, label=label)[label][method]
        markdown = ("### Table 1: re-training / fine-tuning parts of the network\n\n"
                    f"From each seed's instance-balanced run: B+C fine-tunes everything, LB+C the last block and the "
                    f"classifier, both with class-balanced sampling for {self.args.finetune_epochs} epochs "
                    f"(`train-backbone --init`); C is cRT on the frozen features. Mean over seeds "
                    f"{_seeds(self.args.seeds)} with 95% t-intervals; report: `{page}`.\n\n"
                    + summary_table({"": table}, label="re-train", flat=True) + "\n")
        self.write("finetune", markdown, {"rows": table, "timings": self.timings})

    def tau(self) -> None:
        entries = {"val": [], "train": [], "train, learned": []}
        for seed, cache in self.instance_caches():
            entries["val"].append(self.compare(cache, "tau", ("tau_norm",), seed=seed))
            entries["train"].append(self.compare(cache, "tau", ("tau_norm",), select="train", seed=seed))
            entries["train, learned"].append(self.compare(cache, "tau-learned", ("tau_learned",), seed=seed))
        from ltcache.htmlreport import aggregate_rows, load_results, summary_table
        page = self.report("tau", [p for paths in entries.values() for p in paths],
                           labels=[label for label, paths in entries.items() for _ in paths],
                           title="Table 9: tau chosen on val, on train, or learned")
        table = {}
        for label, paths in entries.items():
            loaded = load_results(paths)
            rows = aggregate_rows(loaded, label=label)[label]
            method = next(iter(rows))
            taus = [_chosen_tau(result.results["rows"][0]) for result in loaded]
            table[label] = {**rows[method], "tau": taus}
        markdown = ("### Table 9: tau chosen on val, on the simulated-balanced train set, or learned\n\n"
                    f"Mean over seeds {_seeds(self.args.seeds)} with 95% t-intervals; the tau of each seed in the "
                    f"last column; report: `{page}`.\n\n"
                    + summary_table({"": table}, label="tau from", flat=True, extra="tau") + "\n")
        self.write("tau", markdown, {"rows": table, "timings": self.timings})

    def mlp(self) -> None:
        methods = ("crt", "mlp2", "mlp3")
        paths = [self.compare(cache, "mlp", methods, seed=seed) for seed, cache in self.instance_caches()]
        from ltcache.htmlreport import aggregate_rows, load_results, summary_table
        page = self.report("mlp", paths, title="Table 10: MLP classifiers on frozen features")
        table = aggregate_rows(load_results(paths), label="instance-balanced features")
        markdown = ("### Table 10: 1-, 2- and 3-layer classifiers re-trained on the frozen features\n\n"
                    f"crt is the 1-layer (linear) classifier. Mean over seeds {_seeds(self.args.seeds)} with 95% "
                    f"t-intervals; report: `{page}`.\n\n" + summary_table(table, label="features") + "\n")
        self.write("mlp", markdown, {"rows": table, "timings": self.timings})

    def sampling_weights(self) -> None:
        from ltcache.htmlreport import plot_sampling_weights

        (seed, cache), = self.instance_caches()[:1]
        counts = json.loads((cache / "manifest.json").read_text())["class_counts"]
        folder = self.out / "reports" / "sampling-weights"
        folder.mkdir(parents=True, exist_ok=True)
        table = plot_sampling_weights(folder / "sampling_weights.png", counts, epochs=self.args.epochs or 30)
        columns = table["columns"]
        lines = ["| class | n_j | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
        for j, n in enumerate(counts_sorted := sorted(counts, reverse=True)):
            lines.append(f"| {j} | {n} | " + " | ".join(f"{table['values'][c][j]:.4f}" for c in columns) + " |")
        markdown = ("### Figure 3: sampling weights p_j\n\nFrom the samplers' own functions (ltcache.sampling), "
                    f"classes by decreasing n_j; figure: `{folder / 'sampling_weights.png'}`.\n\n"
                    + "\n".join(lines) + "\n")
        self.write("sampling-weights", markdown, {"class_counts": counts_sorted, **table})


    def findings(self) -> None:
        """The paper's four findings, each as paired differences over seeds (the same seed's split and stage 1 on
        both sides), with 95% t-intervals: an interval that excludes 0 is a difference these runs resolve."""
        from ltcache.htmlreport import mean_interval

        def rows(study: str, name: str) -> dict[str, dict]:
            done = self.out / "results" / study / name / "reports" / "results.json"
            return {row["method"]: row for row in json.loads(done.read_text())["rows"]}

        def paired(values: list[float]) -> str:
            mean, interval = mean_interval(values)
            if interval is None:
                return f"{mean:+.2f}"
            verdict = "resolved" if interval[0] > 0 or interval[1] < 0 else "not resolved"
            return f"{mean:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}] ({verdict})"

        seeds = self.args.seeds
        lines = ["### The paper's four findings on these runs", "",
                 f"Paired differences over seeds {_seeds(seeds)}, mean [95% t-interval]; 'resolved' when the "
                 "interval excludes 0.", ""]
        lines += ["**1. Decoupled classifiers beat joint** (All, method - joint, per stage-1 sampler):", "",
                  "| sampler | NCM | cRT | tau-norm | LWS |", "|---|---:|---:|---:|---:|"]
        for sampler in SAMPLERS:
            per_seed = [rows("samplers", f"{sampler}-seed{seed}") for seed in seeds]
            cells = [paired([r[m]["all"] - r["joint"]["all"] for r in per_seed]) for m in PAPER_FIVE[1:]]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        lines += ["", "**2. Instance-balanced sampling gives the best representation** (All of each decoupled "
                  "classifier, instance - other sampler):", "", "| other sampler | NCM | cRT | tau-norm | LWS |",
                  "|---|---:|---:|---:|---:|"]
        instance = [rows("samplers", f"instance-seed{seed}") for seed in seeds]
        for sampler in SAMPLERS[1:]:
            other = [rows("samplers", f"{sampler}-seed{seed}") for seed in seeds]
            cells = [paired([a[m]["all"] - b[m]["all"] for a, b in zip(instance, other, strict=True)])
                     for m in PAPER_FIVE[1:]]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        lines += ["", "**3. tau-norm trades Many for Few** (instance-balanced features, tau-norm - joint):", "",
                  "| Many | Medium | Few | All |", "|---:|---:|---:|---:|",
                  "| " + " | ".join(paired([r["tau_norm"][k] - r["joint"][k] for r in instance])
                                  for k in ("many", "medium", "few", "all")) + " |"]
        val = [rows("tau", f"instance-seed{seed}") for seed in seeds]
        train = [rows("tau", f"instance-seed{seed}-train") for seed in seeds]
        taus = [(_chosen_tau(v["tau_norm"]), _chosen_tau(t["tau_norm"])) for v, t in zip(val, train, strict=True)]
        lines += ["", "**4. tau chosen on train is close to tau chosen on val** (instance-balanced features; tau "
                  "per seed as val / train, then train - val):", "",
                  "| tau (val / train) | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|",
                  "| " + ", ".join(f"{a:g} / {b:g}" for a, b in taus) + " | "
                  + " | ".join(paired([t["tau_norm"][k] - v["tau_norm"][k] for v, t in zip(val, train, strict=True)])
                               for k in ("many", "medium", "few", "all")) + " |"]
        self.write("findings", "\n".join(lines) + "\n", {"taus_val_train": taus})


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) + f" (n = {len(seeds)})"


def _chosen_tau(row: dict) -> float | None:
    chosen = row.get("chosen", {})
    return chosen.get("tau", chosen.get("learned_tau"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("studies", nargs="+", choices=[*STUDIES, "all"])
    parser.add_argument("--recipe", required=True, help="experiments/*.toml: the stage-1 recipe of every run")
    parser.add_argument("--out", required=True, help="folder for runs/, caches/, results/, reports/ and tables")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds, each a whole replicate (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: the recipe's)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="Table 1 fine-tuning epochs (default 10)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each test score")
    parser.add_argument("--root", default=None, help="dataset folder, if the recipe's default is not right")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be a comma list of integers, e.g. 0,1,2")
    if not args.seeds:
        parser.error("--seeds is empty")
    if "all" in args.studies:
        args.studies = list(STUDIES)
    return args


def main(argv=None) -> int:
    from ltcache.errors import LtcacheError

    args = parse_args(argv)
    study = Study(args)
    begin = time.perf_counter()
    try:
        for name in args.studies:
            getattr(study, name.replace("-", "_"))()
    except LtcacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - begin:.0f} s; steps: {json.dumps(study.timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
