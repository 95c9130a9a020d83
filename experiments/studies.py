"""The paper's studies, one command each, driving ltcache's own API: train, extract, compare, report.

    python experiments/studies.py STUDY [STUDY ...] --recipe experiments/fashion_mnist_lt.toml --out studies/fmnist

STUDY is one of
  samplers          Figure 1 / Table 5: the 4 stage-1 samplers x {joint, NCM, cRT, tau-norm, LWS}
  finetune          Table 1: joint, B+C, B+C at 0.1x lr, LB+C (train-backbone --init), and cRT (C)
  tau               Table 9: tau chosen on val, on the simulated-balanced train set, or learned
  sampling-weights  Figure 3: the samplers' class probabilities p_j (and over epochs, progressive)
  mlp               Table 10: 1-, 2- and 3-layer classifiers re-trained on the frozen features
  findings          the paper's four findings tested on the runs above (paired differences over seeds)
  headline          the tutorial's table (docs/tutorial.md): the paper's five on instance-balanced features at the
                    recipe's epochs, tau chosen on val and on train, each classifier - joint paired by seed
  foundation-heads  gla, gda and cos_la (official recipes) against ltcache's earlier forms, on a tiny random
                    open_clip model extracted with --zero-shot (a code-path check, not a CLIP result)
  all               the paper's studies: samplers, finetune, tau, sampling-weights, mlp and findings

Every study runs each of --seeds end to end (a seed is a whole replicate: split, stage 1 and stage 2) and reports the
mean and 95% t-interval over seeds. What already exists is skipped (a finished run, a cache of that checkpoint, a
comparison of that cache) and a killed run is resumed, so a rerun picks up where the last one stopped. Each study
writes OUT/STUDY.md (its table), OUT/STUDY/index.html (`ltcache report` over its results) and OUT/STUDY.json.

`--publish DIR` then copies each study's STUDY.md, STUDY.json and STUDY/ folder into DIR (the repository's
experiments/reports/DATASET/) and rewrites every block of the documents (README.md, docs/, experiments/*.md) that
includes one of those files (`<!-- include: PATH -->` ... `<!-- end include -->`), so a published number is never
typed by hand; tests/test_published.py fails when a block and its file disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SAMPLERS = ("instance", "class", "sqrt", "progressive")
PAPER_FIVE = ("joint", "ncm", "crt", "tau_norm", "lws")
PAPER_STUDIES = ("samplers", "finetune", "tau", "sampling-weights", "mlp", "findings")
STUDIES = (*PAPER_STUDIES, "headline", "foundation-heads")
# A tiny open_clip model (random weights, nothing downloaded) and ltcache's earlier forms of the foundation heads,
# before they followed their official code (issue 19): the options that give each back.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
EARLIER_FORMS = {"gla": {"calibrate": False, "estimate_on": "train"},
                 "gda": {"normalize": False, "shrinkage": "grid", "zero_shot": False},
                 "cos_la": {"init": "means", "batch_size": 512, "lr": 0.2}}
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
        from ltcache.stage1.checkpoint import load_checkpoint
        from ltcache.stage1.config import train_config_from
        from ltcache.stage1.train import fit, resume

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
        from ltcache.core.fsutil import sha256_file
        from ltcache.stage1.extract import extract

        cache = self.out / "caches" / run.name
        manifest = cache / "manifest.json"
        if manifest.is_file():
            made_from = json.loads(manifest.read_text())["backbone"].get("checkpoint_sha256")
            if made_from == sha256_file(run / "checkpoint.pt"):
                return cache
        log(f"extracting {run.name}")
        return self._timed(f"extract {run.name}", extract, run / "checkpoint.pt", cache, device=self.args.device,
                           overwrite=cache.exists())

    def compare(self, cache: Path, study: str, methods, *, select: str = "val", seed: int = 0,
                params: dict | None = None, variant: str = "", audit: bool = False) -> Path:
        """Compare `methods` (with `params`, a variant of the study) on the cache into
        results/STUDY/CACHE[-select][-variant] (its own heads/ and reports/), unless a comparison of this cache
        generation with these methods is there."""
        from ltcache.lab import compare

        name = cache.name + ("" if select == "val" else f"-{select}") + (f"-{variant}" if variant else "")
        results = self.out / "results" / study / name
        done = results / "reports" / "results.json"
        generation = json.loads((cache / "manifest.json").read_text()).get("generation")
        if done.is_file():
            saved = json.loads(done.read_text())
            if (saved.get("cache_generation") == generation and [r["method"] for r in saved["rows"]] == list(methods)
                    and (not audit or all("protocol_audit" in r for r in saved["rows"]))):
                return results  # an earlier comparison without the audit asked for now is compared again
        log(f"comparing {', '.join(methods)} on {cache.name} (select {select})")
        self._timed(f"compare {study} {results.name}", compare, cache, methods=list(methods), select=select, seed=seed,
                    params=params, out=results, device=self.args.device, bootstrap=self.args.bootstrap,
                    protocol_audit=audit)
        return results

    def report(self, study: str, results: list[Path], *, by: str | None = None, title: str,
               labels: list[str] | None = None) -> Path:
        from ltcache.report import build_report

        out = self.out / study
        log(f"report {out}")
        self._timed(f"report {study}", build_report, results, out, by=by, title=title, overwrite=True,
                    labels=labels)
        return Path(study, "index.html")  # beside OUT/STUDY.md, as it is once published

    def _timed(self, label: str, fn, *args, **kwargs):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[label] = round(time.perf_counter() - begin, 1)
        return result

    def write(self, study: str, markdown: str, data: dict) -> None:
        from ltcache.core.fsutil import atomic_write, write_json

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
        from ltcache.report import aggregate_rows, load_results, summary_table
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
        from ltcache.report import aggregate_rows, load_results, summary_table
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
        from ltcache.report import aggregate_rows, load_results, summary_table
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
        from ltcache.report import aggregate_rows, load_results, summary_table
        page = self.report("mlp", paths, title="Table 10: MLP classifiers on frozen features")
        table = aggregate_rows(load_results(paths), label="instance-balanced features")
        rows = table["instance-balanced features"]
        paired = ["", "Each deeper head - cRT, paired by seed, mean [95% t-interval]:", "",
                  "| head | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|"]
        paired += [f"| {head} | " + " | ".join(paired_cell(rows[head], rows["crt"], key) for key in GROUP_KEYS) + " |"
                   for head in methods[1:]]
        markdown = ("### Table 10: 1-, 2- and 3-layer classifiers re-trained on the frozen features\n\n"
                    f"crt is the 1-layer (linear) classifier. Mean over seeds {_seeds(self.args.seeds)} with 95% "
                    f"t-intervals; report: `{page}`.\n\n" + summary_table(table, label="features") + "\n"
                    + "\n".join(paired) + "\n")
        self.write("mlp", markdown, {"rows": table, "timings": self.timings})

    def sampling_weights(self) -> None:
        from ltcache.report import plot_sampling_weights

        (seed, cache), = self.instance_caches()[:1]
        counts = json.loads((cache / "manifest.json").read_text())["class_counts"]
        folder = self.out / "sampling-weights"
        folder.mkdir(parents=True, exist_ok=True)
        table = plot_sampling_weights(folder / "sampling_weights.png", counts, epochs=self.args.epochs or 30)
        columns = table["columns"]
        lines = ["| class | n_j | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
        for j, n in enumerate(counts_sorted := sorted(counts, reverse=True)):
            lines.append(f"| {j} | {n} | " + " | ".join(f"{table['values'][c][j]:.4f}" for c in columns) + " |")
        markdown = ("### Figure 3: sampling weights p_j\n\nFrom the samplers' own functions (ltcache.core.sampling), "
                    "classes by decreasing n_j; figure: `sampling-weights/sampling_weights.png`.\n\n"
                    + "\n".join(lines) + "\n")
        self.write("sampling-weights", markdown, {"class_counts": counts_sorted, **table})


    def findings(self) -> None:
        """The paper's four findings, each as paired differences over seeds (the same seed's split and stage 1 on
        both sides), with 95% t-intervals: an interval that excludes 0 is a difference these runs resolve. Read from
        OUT/samplers.json and OUT/tau.json (each metric's per-seed values), so a published folder can be re-read."""
        samplers, tau = self._study_rows("samplers"), self._study_rows("tau")
        taus = list(zip(tau["val"]["tau"], tau["train"]["tau"], strict=True))
        self.write("findings", findings_markdown(samplers, tau), {"taus_val_train": taus})

    def headline(self) -> None:
        """The tutorial's table: the paper's five on instance-balanced features (the recipe as it is, at --epochs if
        given), mean and 95% t-interval over seeds; tau chosen on val and on the simulated-balanced train set per
        seed; each decoupled classifier - joint, paired by seed. The first seed's weight-norm and tau-curve figures
        (Fig. 2) go beside the page."""
        import shutil

        from ltcache.report import aggregate_rows, load_results

        val, train = [], []
        for seed, cache in self.instance_caches():
            val.append(self.compare(cache, "headline", PAPER_FIVE, seed=seed, audit=True))
            train.append(self.compare(cache, "headline", ("tau_norm",), select="train", seed=seed))
        page = self.report("headline", val, title="The paper's five on instance-balanced features")
        for figure in ("weight_norms.png", "tau_curve.png"):
            shutil.copyfile(val[0] / "reports" / figure, self.out / "headline" / figure)
        label = "instance-balanced features"
        loaded_val, loaded_train = load_results(val), load_results(train)
        dataset, recipe = self._recipe_summary()
        data = {"dataset": dataset, "recipe": recipe, "seeds": self.args.seeds, "page": str(page),
                "rows": aggregate_rows(loaded_val, label=label),
                "tau_from_train": aggregate_rows(loaded_train, label=label)[label]["tau_norm"],
                "tau": {"val": [_chosen_tau(r.results["rows"][PAPER_FIVE.index("tau_norm")]) for r in loaded_val],
                        "train": [_chosen_tau(r.results["rows"][0]) for r in loaded_train]},
                "optimism": {method: [row["protocol_audit"]["optimism_mean_per_class"] for r in loaded_val
                                      for row in r.results["rows"] if row["method"] == method]
                             for method in PAPER_FIVE},
                "timings": self.timings}
        self.write("headline", headline_markdown(data), data)

    def foundation_heads(self) -> None:
        """gla, gda and cos_la as their official code has them (ltcache's defaults) against ltcache's earlier form of
        each (the same methods with the options that give it back), on a cache of a tiny random-weight open_clip
        model extracted with --zero-shot from the recipe's dataset: a check of the code paths on real images, not a
        result about CLIP (random weights give a text head that knows nothing). Mean over stage-2 seeds."""
        from ltcache.report import aggregate_rows, load_results, summary_table
        from ltcache.stage1.extract import extract

        config = self.out / "tiny-clip.json"
        self.out.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(TINY_CLIP, indent=1) + "\n")
        cache = self.out / "caches" / "tiny-clip"
        dataset, _ = self._recipe_summary()
        if not (cache / "manifest.json").is_file():
            log(f"extracting a tiny random open_clip model on {dataset}")
            self._timed("extract tiny-clip", extract, None, cache, dataset=dataset, backbone=f"open_clip:{config}",
                        zero_shot=True, templates="simple", root=self.args.root, device=self.args.device)
        methods = tuple(EARLIER_FORMS)
        forms = {"official (today's defaults)": {}, "earlier ltcache form": EARLIER_FORMS}
        table, paths, labels = {}, [], []
        for label, params in forms.items():
            compared = [self.compare(cache, "foundation-heads", methods, seed=seed, params=params or None,
                                     variant=("earlier" if params else "official") + f"-seed{seed}")
                        for seed in self.args.seeds]
            table.update(aggregate_rows(load_results(compared), label=label))
            paths += compared
            labels += [label] * len(compared)
        page = self.report("foundation-heads", paths, labels=labels,
                           title="gla, gda and cos_la: the official recipes against ltcache's earlier forms")
        options = "; ".join(f"{name}: " + ", ".join(f"{key}={value}" for key, value in values.items())
                            for name, values in EARLIER_FORMS.items())
        markdown = (f"### {dataset}: gla, gda and cos_la, the official recipes against ltcache's earlier forms\n\n"
                    "Cache: a tiny open_clip model with random weights (its config is `tiny_clip` in "
                    "foundation-heads.json), extracted with `--zero-shot --templates simple`, the joint head the "
                    "instance-balanced linear probe; random weights make the text head and the features "
                    "uninformative, so this checks code paths on real images, not CLIP. The earlier forms are the "
                    f"same methods with options ({options}). Mean ± half the 95% t-interval over stage-2 seeds "
                    f"{_seeds(self.args.seeds)} (gla and gda are deterministic); report: `{page}`.\n\n"
                    + summary_table(table, label="form") + "\n")
        self.write("foundation-heads", markdown, {"rows": table, "earlier_forms": EARLIER_FORMS,
                                                  "tiny_clip": TINY_CLIP, "timings": self.timings})

    def _study_rows(self, study: str) -> dict:
        path = self.out / f"{study}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing; run the {study} study into this --out first")
        return json.loads(path.read_text())["rows"]

    def _recipe_summary(self) -> tuple[str, str]:
        """(the dataset, a sentence of the stage-1 recipe) as the runs resolve it."""
        from ltcache.stage1.config import train_config_from

        cfg = train_config_from({"epochs": self.args.epochs} if self.args.epochs else {},
                                explicit={"epochs"} if self.args.epochs else set(),
                                recipe=Path(self.args.recipe)).resolved()
        recipe = (f"Recipe `{Path(self.args.recipe).name}`: {cfg.backbone}, {cfg.sampler}-balanced sampling, "
                  f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g} cosine to 0, weight decay "
                  f"{cfg.weight_decay:g}; stage 2 at the paper's defaults")
        return cfg.dataset, recipe

    # ------------------------------------------------------------------------------------------------ publishing

    def publish(self, studies: list[str], folder: Path) -> None:
        """Copy each study's table, data and page folder into `folder`, then rewrite every include block of the
        README, docs/ and experiments/*.md (docs/generate.py), so the published tables are the files just copied."""
        import importlib.util
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        for study in studies:
            for name in (f"{study}.md", f"{study}.json"):
                shutil.copyfile(self.out / name, folder / name)
            if (self.out / study).is_dir():
                shutil.rmtree(folder / study, ignore_errors=True)
                shutil.copytree(self.out / study, folder / study)
            log(f"published {study} into {folder}")
        spec = importlib.util.spec_from_file_location("ltcache_docs_generate", REPO / "docs" / "generate.py")
        generate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generate)
        for name in generate.refresh_documents(strict=False):
            log(f"rewrote {name}")


GROUP_KEYS = ("many", "medium", "few", "all")
REPO = Path(__file__).resolve().parent.parent


def findings_markdown(samplers: dict, tau: dict) -> str:
    """findings.md from the samplers and tau studies' rows (their STUDY.json): every cell a paired difference."""
    seeds = samplers["instance"]["joint"]["seeds"]
    lines = ["### The paper's four findings on these runs", "",
             f"Paired differences over seeds {_seeds(seeds)}, mean [95% t-interval]; 'resolved' when the "
             "interval excludes 0.", ""]
    lines += ["**1. Decoupled classifiers beat joint** (All, method - joint, per stage-1 sampler):", "",
              "| sampler | NCM | cRT | tau-norm | LWS |", "|---|---:|---:|---:|---:|"]
    for sampler in SAMPLERS:
        rows = samplers[sampler]
        lines.append(f"| {sampler} | " + " | ".join(paired_cell(rows[m], rows["joint"], "all")
                                                   for m in PAPER_FIVE[1:]) + " |")
    lines += ["", "**2. Instance-balanced sampling gives the best representation** (All of each decoupled "
              "classifier, instance - other sampler):", "", "| other sampler | NCM | cRT | tau-norm | LWS |",
              "|---|---:|---:|---:|---:|"]
    instance = samplers["instance"]
    for sampler in SAMPLERS[1:]:
        lines.append(f"| {sampler} | " + " | ".join(paired_cell(instance[m], samplers[sampler][m], "all")
                                                   for m in PAPER_FIVE[1:]) + " |")
    lines += ["", "**3. tau-norm trades Many for Few** (instance-balanced features, tau-norm - joint):", "",
              "| Many | Medium | Few | All |", "|---:|---:|---:|---:|",
              "| " + " | ".join(paired_cell(instance["tau_norm"], instance["joint"], key) for key in GROUP_KEYS)
              + " |"]
    val, train = tau["val"], tau["train"]
    lines += ["", "**4. tau chosen on train is close to tau chosen on val** (instance-balanced features; tau "
              "per seed as val / train, then train - val):", "",
              "| tau (val / train) | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|",
              "| " + ", ".join(f"{a:g} / {b:g}" for a, b in zip(val["tau"], train["tau"], strict=True)) + " | "
              + " | ".join(paired_cell(train, val, key) for key in GROUP_KEYS) + " |"]
    return "\n".join(lines) + "\n"


def headline_markdown(data: dict) -> str:
    """headline.md from headline.json: the table of the paper's five (mean ± half the 95% t-interval over seeds),
    each decoupled classifier - joint paired by seed, and tau chosen on train against tau chosen on val."""
    from ltcache.report import summary_table

    (label, rows), = data["rows"].items()
    rows = {**rows, "tau_norm": {**rows["tau_norm"], "tau": data["tau"]["val"]}}  # tau: the last column
    table = {label: rows}
    lines = [f"### {data['dataset']}: the paper's five classifiers on instance-balanced features", "",
             f"{data['recipe']}; seeds {_seeds(data['seeds'])}, each a whole replicate (split, stage 1, stage 2). "
             "Test scored once per method; mean ± half the 95% t-interval over seeds; the last column is the tau "
             f"chosen on val for each seed. Report: `{data['page']}`.", "",
             summary_table(table, label="features", extra="tau"), "",
             "Each decoupled classifier - joint, paired by seed, mean [95% t-interval] ('resolved' when the interval "
             "excludes 0):", "", "| method | Many | Medium | Few | All |", "|---|---:|---:|---:|---:|"]
    for method in PAPER_FIVE[1:]:
        lines.append(f"| {method} | " + " | ".join(paired_cell(rows[method], rows["joint"], key)
                                                  for key in GROUP_KEYS) + " |")
    pairs = ", ".join(f"{t:g} / {v:g}" for t, v in zip(data["tau"]["train"], data["tau"]["val"], strict=True))
    lines += ["", "tau chosen on the simulated-balanced train set (`--select train`, Appendix B.5) / on val, per seed: "
              f"{pairs}; test All, tau from train - tau from val: "
              f"{paired_cell(data['tau_from_train'], rows['tau_norm'], 'all')}.", "",
              "The protocol audit (`compare --protocol-audit`): how much higher each method's test mean per-class "
              "accuracy would read had its choices been made on test, mean [95% t-interval] over seeds:", "",
              "| " + " | ".join(PAPER_FIVE) + " |", "|" + "---:|" * len(PAPER_FIVE),
              "| " + " | ".join(interval_cell(data["optimism"][method]) for method in PAPER_FIVE) + " |"]
    return "\n".join(lines) + "\n"


def interval_cell(values: list[float]) -> str:
    """The mean of `values` with its 95% t-interval, and whether the interval excludes 0."""
    from ltcache.report import mean_interval

    mean, interval = mean_interval(values)
    if interval is None:
        return f"{mean:+.2f} (one seed)"
    verdict = "resolved" if interval[0] > 0 or interval[1] < 0 else "not resolved"
    return f"{mean:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}] ({verdict})"


def paired_cell(a: dict, b: dict, key: str) -> str:
    """a - b of metric `key`, paired by seed (each is an aggregate_rows entry with per-seed values): the mean and
    95% t-interval, and whether the interval excludes 0."""
    first, second = (dict(zip(stats["seeds"], stats[key]["values"], strict=True)) for stats in (a, b))
    return interval_cell([first[seed] - second[seed] for seed in first if seed in second])


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) + f" (n = {len(seeds)})"


def _chosen_tau(row: dict) -> float | None:
    chosen = row.get("chosen", {})
    return chosen.get("tau", chosen.get("learned_tau"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("studies", nargs="+", choices=[*STUDIES, "all"])
    parser.add_argument("--recipe", help="experiments/*.toml: the stage-1 recipe of every run (every study but "
                        "findings needs it)")
    parser.add_argument("--out", required=True, help="folder for runs/, caches/, results/, reports/ and tables")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds, each a whole replicate (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: the recipe's)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="Table 1 fine-tuning epochs (default 10)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each test score")
    parser.add_argument("--root", default=None, help="dataset folder, if the recipe's default is not right")
    parser.add_argument("--device", default=None)
    parser.add_argument("--publish", default=None, help="copy the studies' tables, data and pages into this folder "
                        "(e.g. experiments/reports/fashion-mnist-lt) and refresh the documents' "
                        "include blocks of them")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be a comma list of integers, e.g. 0,1,2")
    if not args.seeds:
        parser.error("--seeds is empty")
    if "all" in args.studies:
        args.studies = [*PAPER_STUDIES, *(s for s in args.studies if s not in (*PAPER_STUDIES, "all"))]
    if args.recipe is None and set(args.studies) - {"findings"}:
        parser.error("--recipe is required (every study but findings trains from it)")
    return args


STUDIES_MARKER = "ltcache-studies.json"


def claim_folder(path: Path, option: str, *, check_only: bool = False) -> None:
    """The studies write only into a folder they made: a new or empty one (marked as theirs with
    ltcache-studies.json, sealed with its own hash), or one that holds that marker. A folder of anything else (a
    user's notes, an earlier hand-written sampling-weights.md) is refused before anything is written."""
    from ltcache.core.errors import LtcacheError
    from ltcache.core.folders import FolderKind, read_marker, write_marker

    kind = FolderKind("studies folder", STUDIES_MARKER, STUDIES_MARKER, ("kind",), self_hash="marker_sha256")
    if path.exists() and not path.is_dir():
        raise LtcacheError(f"{option} {path} is a file; pass a folder")
    if path.is_dir() and any(path.iterdir()):
        marker = read_marker(path, kind)
        if marker is None or marker.get("kind") != "ltcache studies":
            raise LtcacheError(f"{option} {path} holds files that experiments/studies.py did not make (it has no "
                               "valid ltcache-studies.json); pass a new or empty folder")
        return
    if check_only:
        return
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind, {"kind": "ltcache studies",
                              "note": "made by experiments/studies.py; it replaces only its own files here"})


def main(argv=None) -> int:
    from ltcache.core.errors import LtcacheError, set_interface

    set_interface("cli")  # a command line: errors name its --options, not keyword arguments
    args = parse_args(argv)
    study = Study(args)
    begin = time.perf_counter()
    try:
        folders = [(Path(args.out), "--out"), *([(Path(args.publish), "--publish")] if args.publish else [])]
        for check_only in (True, False):  # both refused before either is made
            for path, option in folders:
                claim_folder(path, option, check_only=check_only)
        for name in args.studies:
            getattr(study, name.replace("-", "_"))()
        if args.publish:
            study.publish(args.studies, Path(args.publish))
    except LtcacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - begin:.0f} s; steps: {json.dumps(study.timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
