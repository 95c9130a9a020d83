"""The `ltcache` command line: each command parses its options and calls one typed function."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from ltcache.errors import LtcacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decoupled long-tailed recognition over a feature cache (Kang et al., ICLR 2020).")
_state = {"debug": False}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    _state["debug"] = debug


def _run(fn: Callable, *args, **kwargs):
    """Call fn; a LtcacheError becomes one line on stderr and exit code 2 (a traceback only under --debug)."""
    try:
        return fn(*args, **kwargs)
    except LtcacheError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        raise typer.Exit(2) from None


def one_line(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (which appends its traceback)."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in message:
        last = lines[-1]
        return last.split("LtcacheError: ", 1)[-1]
    return " ".join(lines)


def parse_taus(text: str) -> tuple[float, ...]:
    """'0,0.1,0.5' or 'start:stop:step' (stop included)."""
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return tuple(round(start + i * step, 10) for i in range(max(count, 0)))
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise LtcacheError(f"--taus {text!r} is not a list like 0,0.1,0.5 or a range like 0:2:0.1") from None


def parse_params(items: list[str]) -> dict[str, dict]:
    """['crt.epochs=20', 'ncm.metric=euclidean'] -> {'crt': {'epochs': '20'}, 'ncm': {'metric': 'euclidean'}}."""
    params: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise LtcacheError(f"--set {item!r} must look like METHOD.PARAM=VALUE, e.g. crt.epochs=20")
        params.setdefault(method, {})[name] = value
    return params


def _thresholds(many: int, few: int):
    from ltcache.metrics import ShotThresholds

    if few > many:
        raise LtcacheError(f"--few ({few}) must not exceed --many ({many})")
    return ShotThresholds(many=many, few=few)


def _echo_json(obj) -> None:
    from ltcache.fsutil import json_text

    typer.echo(json_text(obj))


ManyOpt = typer.Option(100, "--many", help="Many-shot: more than this many train images.")
FewOpt = typer.Option(20, "--few", help="Few-shot: fewer than this many train images.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present).")


@app.command("train-backbone")
def train_backbone(
    ctx: typer.Context,
    out: Path | None = typer.Option(None, "--out", help="Run folder for config.json, metrics.jsonl, checkpoint.pt."),
    config: Path | None = typer.Option(None, "--config", help="TOML recipe (experiments/*.toml); flags win."),
    dataset: str = typer.Option("digits-lt", help="Registered dataset name."),
    root: str | None = typer.Option(None, help="Dataset folder (fashion-mnist-lt: the idx files)."),
    imbalance_factor: float | None = typer.Option(None, help="n_max / n_min of the long-tail profile."),
    n_max: int | None = typer.Option(None, help="Train images of the most frequent class."),
    seed: int = typer.Option(0, help="Seeds the split, the sampler and the initialization."),
    val_per_class: int | None = typer.Option(None, help="Balanced val images per class (dataset default)."),
    image_size: int | None = typer.Option(None, help="Crop size for file datasets (default 224)."),
    split_dir: str | None = typer.Option(None, help="Folder with the split files (default: --root)."),
    profile: str | None = typer.Option(None, help="imagefolder long tail: exponential, step or none."),
    download: bool = typer.Option(False, help="cifar*-lt: let torchvision download the data (needs internet)."),
    backbone: str | None = typer.Option(None, help="smallresnet8/14, resnet10/32, any torchvision model name."),
    pretrained: bool = typer.Option(False, help="Start from torchvision's ImageNet weights (downloads them)."),
    trainable: str | None = typer.Option(None, help="Train only these parameter groups, e.g. layer4,fc."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA)."),
    sampler: str = typer.Option("instance", help="instance, class, sqrt, progressive (Eq. 1-2) or class-aware."),
    samples_per_class: int = typer.Option(4, help="class-aware sampler: consecutive images per visited class."),
    loss: str = typer.Option("ce", help="ce, focal, cb_ce, cb_focal, ldam, balanced_softmax, logit_adjusted."),
    loss_param: list[str] = typer.Option([], "--loss-param", help="Loss parameter NAME=VALUE, e.g. gamma=2, "
                                         "beta=0.9999, drw_epoch=160, tau=1 (repeatable)."),
    epochs: int = typer.Option(30, help="Training epochs."),
    batch_size: int = typer.Option(128, help="Batch size."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 0.2 x batch / 512)."),
    weight_decay: float = typer.Option(5e-4, help="SGD weight decay."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    workers: int = typer.Option(0, help="Data-loading worker processes."),
    device: str | None = DeviceOpt,
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
):
    """Stage 1: train a backbone and its linear classifier with a sampling strategy (CE, SGD, cosine lr)."""
    from ltcache.config import train_config_from
    from ltcache.train import fit

    # Compared by name: the enum lives in click or in typer's vendored copy of it, depending on the version.
    explicit = {name for name in ctx.params
                if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    cfg = _run(train_config_from, ctx.params, explicit=explicit, recipe=config)
    run_dir = _run(fit, cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        typer.echo(f"checkpoint: {run_dir / 'checkpoint.pt'}")


@app.command("extract")
def extract_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt from ltcache train-backbone."),
    out: Path = typer.Option(..., "--out", help="Cache folder to create."),
    root: str | None = typer.Option(None, help="Dataset folder, if it moved since training."),
    split_dir: str | None = typer.Option(None, help="Split-file folder, if it moved since training."),
    dtype: str = typer.Option("float32", help="float32 or float16 features."),
    batch_size: int = typer.Option(512, help="Images per forward pass."),
    workers: int = typer.Option(0, help="Data-loading worker processes."),
    shard_rows: int = typer.Option(65536, help="Rows per HDF5 shard."),
    device: str | None = DeviceOpt,
    overwrite: bool = typer.Option(False, help="Replace an existing cache (only once the new one is complete)."),
    train_views: int = typer.Option(0, help="Also store K augmented views of every train image; cRT, LWS, DisAlign "
                                    "and the other trained heads then sample among them."),
):
    """Cache penultimate features, labels and the joint classifier (W, b) of train, val and test."""
    from ltcache.extract import extract

    cache = _run(extract, checkpoint, out, root=root, split_dir=split_dir, dtype=dtype, batch_size=batch_size,
                 workers=workers, device=device, shard_rows=shard_rows, overwrite=overwrite, train_views=train_views)
    typer.echo(f"cache: {cache}")


@app.command("sweep-tau")
def sweep_tau_cmd(
    cache: Path = typer.Argument(..., help="Cache folder."),
    taus: str = typer.Option("0:2:0.1", help="Grid: 0,0.5,1 or start:stop:step."),
    select: str = typer.Option("val", help="val, or train for the simulated-balanced train metric (App. B.5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    device: str | None = DeviceOpt,
    many: int = ManyOpt,
    few: int = FewOpt,
):
    """Tau-normalization: Many/Medium/Few/All for every tau on the selection split, then test at the chosen tau."""
    from ltcache.lab import sweep_tau
    from ltcache.report import markdown_table, tau_table

    result = _run(lambda: sweep_tau(cache, taus=parse_taus(taus), select=select, device=device,
                                    thresholds=_thresholds(many, few)))
    if as_json:
        _echo_json(result)
        return
    test = result["test"]
    typer.echo(f"tau sweep on {select} (* = chosen by mean per-class accuracy)\n")
    typer.echo(tau_table(result["curve"], result["best_tau"]))
    groups = {g: test[f"n_{g}"] for g in ("many", "medium", "few")}
    typer.echo(f"\nchosen tau = {result['best_tau']:g}; test, scored once:\n")
    typer.echo(markdown_table({"groups": groups, "rows": [{"method": "tau_norm", **test,
                                                           "chosen": {"tau": result["best_tau"]}}]}))


@app.command("compare")
def compare_cmd(
    cache: Path = typer.Argument(..., help="Cache folder."),
    methods: str | None = typer.Option(None, help="Comma-separated list, or 'all' (default: the paper's five)."),
    select: str = typer.Option("val", help="val, or train for the simulated-balanced train metric (App. B.5)."),
    set_: list[str] = typer.Option([], "--set", help="Hyperparameter override METHOD.PARAM=VALUE (repeatable)."),
    seed: int = typer.Option(0, help="Seed for cRT / LWS."),
    bootstrap: int = typer.Option(1000, help="Test resamples for the 95% intervals (0: none)."),
    seeds: int = typer.Option(1, help="Refit each stochastic method with N seeds: mean and 95% interval."),
    train_views: bool = typer.Option(True, help="Fit trained heads on the cache's augmented train views, "
                                     "when it has them (extract --train-views)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    device: str | None = DeviceOpt,
    many: int = ManyOpt,
    few: int = FewOpt,
):
    """Fit every stage-2 method, select on val, score test once; write reports/ (json, csv, md, plots)."""
    from ltcache.lab import compare
    from ltcache.report import markdown_table
    from ltcache.stage2 import resolve_method_list

    chosen = resolve_method_list(methods)
    summary = _run(lambda: compare(cache, methods=chosen, select=select, params=parse_params(set_), seed=seed,
                                   device=device, thresholds=_thresholds(many, few), bootstrap=bootstrap,
                                   seeds=seeds, train_views=train_views))
    if as_json:
        _echo_json(summary)
        return
    typer.echo(markdown_table(summary))
    typer.echo(f"\nselected on {select}; reports in {Path(summary['reports']['results.md']).parent}")


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the stage-2 methods with their hyperparameters and defaults (override with compare --set)."""
    from ltcache.stage2 import METHODS, PAPER_ORDER, method_names

    listing = [{"method": name, "in_default_compare": name in PAPER_ORDER, "summary": METHODS[name].summary,
                "defaults": METHODS[name].defaults} for name in method_names()]
    if as_json:
        _echo_json(listing)
        return
    for entry in listing:
        defaults = ", ".join(f"{k}={_short(v)}" for k, v in entry["defaults"].items()) or "-"
        mark = "*" if entry["in_default_compare"] else " "
        typer.echo(f"{mark} {entry['method']:<12} {entry['summary']}\n{'':15}{defaults}")
    typer.echo("\n* run by default; `ltcache compare CACHE --methods all` runs every method.")


def _short(value) -> str:
    if isinstance(value, tuple) and len(value) > 4:
        return f"{value[0]:g}..{value[-1]:g} ({len(value)} values)"
    return str(value)


@app.command("info")
def info_cmd(
    cache: Path = typer.Argument(..., help="Cache folder."),
    verify: bool = typer.Option(False, help="Also check every shard's sha256 against the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """A short summary of a cache: dataset, splits, feature dim, class counts, backbone, fitted heads."""
    from ltcache.lab import info

    summary = _run(info, cache, verify=verify)
    if as_json:
        _echo_json(summary)
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>18}: {value}")
    if verify and summary["corrupt_shards"]:
        typer.echo(f"error: {len(summary['corrupt_shards'])} shard(s) fail their sha256 check; re-run ltcache "
                   "extract", err=True)
        raise typer.Exit(2)


@app.command("import-features")
def import_features_cmd(
    out: Path = typer.Option(..., "--out", help="Cache folder to create."),
    train: Path = typer.Option(..., help="Train features: .npz/.pt with features [n, d] and labels [n], or .npy."),
    test: Path = typer.Option(..., help="Test features, same format."),
    val: Path | None = typer.Option(None, help="Val features (without them, select with --select train)."),
    head: Path | None = typer.Option(None, help=".npz/.pt with the model's classifier: weight [C, d], bias [C]."),
    class_names: Path | None = typer.Option(None, help="Text file, one class name per line."),
    dtype: str = typer.Option("float32", help="float32 or float16 in the cache."),
    seed: int = typer.Option(0, help="Seed of the linear probe fitted when there is no --head."),
    overwrite: bool = typer.Option(False, help="Replace an existing cache (only once the new one is complete)."),
):
    """Build a cache from features computed elsewhere (CLIP, DINOv2, timm, ...); the manifest marks them imported."""
    from ltcache.import_features import import_features

    cache = _run(import_features, out, train=train, test=test, val=val, head=head, class_names=class_names,
                 dtype=dtype, overwrite=overwrite, seed=seed)
    typer.echo(f"cache: {cache}")


@app.command("inat-splits")
def inat_splits_cmd(
    json_dir: Path = typer.Argument(..., help="Folder with iNaturalist 2018's train2018.json and val2018.json."),
    out: Path = typer.Option(..., "--out", help="Folder for iNaturalist18_train.txt and iNaturalist18_val.txt."),
    overwrite: bool = typer.Option(False, help="Replace existing split files."),
):
    """Turn the iNaturalist 2018 json files into the split files that --dataset inat2018 reads."""
    from ltcache.data.files import inat_json_to_split_files

    for split, path in _run(inat_json_to_split_files, json_dir, out, overwrite=overwrite).items():
        typer.echo(f"{split}: {path}")


@app.command("demo")
def demo_cmd(
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: a fresh ./ltcache-demo[-N])."),
    epochs: int = typer.Option(40, help="Stage-1 epochs."),
    seed: int = typer.Option(0, help="Seed."),
    device: str | None = DeviceOpt,
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """digits-LT end to end on a CPU: train a small ResNet, cache features, compare every classifier."""
    from ltcache.demo import fresh_folder, run_demo
    from ltcache.report import markdown_table

    folder = out if out is not None else fresh_folder(Path("ltcache-demo"))
    summary = _run(run_demo, folder, epochs=epochs, seed=seed, device=device, overwrite=overwrite)
    typer.echo(markdown_table(summary))
    typer.echo(f"\ndigits-LT demo done in {summary['seconds']} s; selected on val, test scored once.")
    for name in ("results.md", "weight_norms.png", "tau_curve.png"):
        typer.echo(f"  {name}: {summary['reports'][name]}")


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug, not bad input: keep it to one line unless --debug
        if "--debug" in sys.argv:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", err=True)
        sys.exit(1)
