"""The `ltcache` command line: each command parses its options and calls one typed function.

Options are generated from their declarations in config.py (params.py): type, default, range and help are written
once, and every value is checked against them before the command does anything. Every error is one line on stderr
with exit code 2 (usage mistakes included); a traceback appears only with --debug, and exit code 1 only for bugs.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import typer

from ltcache.cli.reference import COMMANDS, Command
from ltcache.core import options
from ltcache.core.console import cli_handler, is_main_process, remove_cli_handler
from ltcache.core.errors import LtcacheError, set_interface
from ltcache.core.options import parse_params  # noqa: F401  (the --set parser, used by the commands)
from ltcache.core.params import GRID, Param
from ltcache.stage1 import config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Decoupled long-tailed recognition over a feature cache "
                  "(Kang et al., ICLR 2020).")
_state = {"debug": False}


def _show_version(value: bool) -> None:
    if value:
        from ltcache._version import __version__

        typer.echo(f"ltcache {__version__}")
        raise typer.Exit()


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
            version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                         help="Print the version and exit.")):
    _state["debug"] = debug
    cli_handler()  # the library's messages (logging, logger "ltcache") on stderr, bare
    set_interface("cli")  # errors name --options; the command's finally (see `command`) sets "api" back


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


def _matrix_params():
    from ltcache.cli.matrix import MATRIX

    return MATRIX


def _thresholds(many: int, few: int):
    from ltcache.metrics import ShotThresholds

    options.check_thresholds(many, few)
    return ShotThresholds(many=many, few=few)


def _echo_json(obj) -> None:
    from ltcache.core.fsutil import json_text

    typer.echo(json_text(obj))


# ------------------------------------------------------------------------------ commands from declarations


def _annotation(param: Param):
    kind = {GRID: str, Path: Path, list: list[str]}.get(param.type, param.type)
    return kind | None if param.default is None and kind is not bool else kind


def _typer_default(param: Param, *, argument: bool):
    help_text = param.help_text()
    if param.name in options.LISTED_BY and (callable(param.choices) or param.name == "backbone"):
        help_text += f" [ltcache list {options.LISTED_BY[param.name]} shows them]"
    if argument:
        return typer.Argument(None if param.optional else ..., help=help_text, show_default=False)
    if param.type is bool and not param.option:
        names = (f"{param.flag}/--no-{param.flag[2:]}",)
    else:
        names = (param.flag,)
    required = param.default is None and not param.optional and param.type is not list
    default = ... if required else (list(param.default) if param.type is list else param.default)
    if param.type == GRID and not isinstance(default, str):
        default = ",".join(f"{v:g}" for v in default)
    return typer.Option(default, *names, help=help_text, show_default=param.type is not list)


def command(name: str, params: Iterable[Param], *, arguments: Iterable[Param] = (), context: bool = False):
    """Register `body(**values)` as a command whose arguments and options are generated from declarations. Every
    value is checked against its declaration (a one-line error, exit 2) before `body` runs."""
    params, arguments = tuple(params), tuple(arguments)

    def wrap(body: Callable) -> Callable:
        # every command receives its click context (typer.Context, public API): provenance reads which options
        # were given on the command line; a body declared with context=True gets it too
        signature = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        for param in arguments:
            annotation = list[str] if param.type is list else param.type
            signature.append(inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                               default=_typer_default(param, argument=True)))
        for param in params:
            signature.append(inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY,
                                               annotation=_annotation(param),
                                               default=_typer_default(param, argument=False)))

        # Registry choices (datasets, losses, ...) import torch: checked last, so a plain range error fails fast.
        ordered = sorted((*arguments, *params), key=lambda p: callable(p.choices))

        def run(ctx: typer.Context, **values):
            _record(ctx, name, arguments, params, values)
            if context:
                values["ctx"] = ctx

            def checked():
                for param in ordered:
                    value = values[param.name]
                    values[param.name] = param.parse(value) if param.type == GRID else param.check(value)

            try:
                _run(checked)
                return body(**values)
            finally:  # a later call from Python (a notebook, a test) is not labelled with this command
                from ltcache.core.runtime import record_command

                record_command([])
                set_interface("api")
                remove_cli_handler()

        run.__signature__ = inspect.Signature(signature)
        run.__annotations__ = {p.name: p.annotation for p in signature}
        run.__doc__ = body.__doc__
        run.__name__ = body.__name__
        app.command(name, short_help=_first_sentence(body.__doc__ or ""))(run)
        COMMANDS[name] = Command(name, body.__doc__ or "", arguments, params)
        return body

    return wrap


def _first_sentence(doc: str) -> str:
    """The command's summary in `ltcache --help`: its docstring's first sentence, whole (click would cut it)."""
    text = " ".join(doc.split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _record(ctx: typer.Context | None, name: str, arguments: tuple[Param, ...], params: tuple[Param, ...],
            values: dict) -> None:
    """Record `ltcache NAME ARG... --option value ...` with every option given on the command line (provenance)."""
    from ltcache.core.runtime import record_command

    def given(key: str) -> bool:
        return ctx is None or getattr(ctx.get_parameter_source(key), "name", "") == "COMMANDLINE"

    argv = ["ltcache", *(["--debug"] if _state["debug"] else []), name]
    for param in arguments:
        value = values.get(param.name)
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    for param in (*params, *(p for p in config.TRAIN_EXTRA if name == "train-backbone")):
        value = values.get(param.name)
        if param.name not in values or not given(param.name) or value is None:
            continue
        if param.type is bool and not param.option:
            argv.append(param.flag if value else f"--no-{param.flag[2:]}")
        elif param.type is bool:
            argv += [param.flag] if value else []
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [param.flag, str(item)]
        else:
            argv += [param.flag, str(value)]
    record_command(argv)


_CACHE = Param("cache", Path, None, "Cache folder.")


@command("train-backbone", [*(p for p in config.TrainConfig.options().values() if p.type is not dict),
                            *config.TRAIN_EXTRA], context=True)
def train_backbone(ctx: typer.Context, *, resume: Path | None, config: Path | None, **values):
    """Stage 1: train a backbone and its linear classifier with a sampling strategy (CE, SGD, cosine lr)."""
    from ltcache.stage1.config import train_config_from

    # Compared by name: the enum lives in click or in typer's vendored copy of it, depending on the version.
    explicit = {name for name in ctx.params
                if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    if resume is not None:
        others = sorted(explicit - {"resume", "device", "workers"})
        if others:
            _run(_raise, f"--resume continues {resume} with its own config; drop --{others[0].replace('_', '-')} "
                         "(only --device and --workers may change)")
        from ltcache.stage1.train import resume as resume_run

        run_dir = _run(resume_run, resume, device=values["device"],
                       workers=values["workers"] if "workers" in explicit else None)
    else:
        cfg = _run(train_config_from, values, explicit=explicit, recipe=config)  # no torch until the options hold
        from ltcache.stage1.train import fit

        run_dir = _run(fit, cfg, inputs=[config])
    if is_main_process():  # under torchrun, one line from rank 0 only
        typer.echo(f"checkpoint: {run_dir / 'checkpoint.pt'}")


def _raise(message: str):
    raise LtcacheError(message)


@command("extract", config.EXTRACT,
         arguments=[Param("checkpoint", Path, None, "A train-backbone run folder or its checkpoint.pt (or the "
                          "official code's .pth); omit it to extract a --backbone as it is, e.g. --backbone "
                          "resnet50 --pretrained.",
                          optional=True)])
def extract_cmd(*, checkpoint: Path | None, out: Path, **options):
    """Cache penultimate features, labels and the jointly trained classifier (W, b) of train, val and test. Without
    a checkpoint, a --backbone (torchvision, timm:<name>, open_clip:<arch>/<tag>) is extracted as it is, with its
    library's preprocessing; the cache's classifier (W, b) is then the model's own when its classes are the
    dataset's, else an instance-balanced linear probe on the cached train features."""
    from ltcache.stage1.extract import extract

    cache = _run(extract, checkpoint, out, **options)
    if is_main_process():  # under torchrun, one line from rank 0 only
        typer.echo(f"cache: {cache}")


@command("sweep-tau", options.SWEEP_TAU, arguments=[_CACHE])
def sweep_tau_cmd(*, cache: Path, taus, select: str, as_json: bool, device: str | None, many: int, few: int,
                  memory_budget: str | None, precision: str):
    """Tau-normalization: Many/Medium/Few/All for every tau on the selection split, then test at the chosen tau."""
    from ltcache.lab import sweep_tau
    from ltcache.report import accuracy_table, curve_table

    result = _run(lambda: sweep_tau(cache, taus=taus, select=select, device=device,
                                    thresholds=_thresholds(many, few), memory_budget=memory_budget,
                                    precision=precision))
    if as_json:
        _echo_json(result.as_dict())
        return
    test = result.test
    typer.echo(f"tau sweep on {select} (* = chosen by mean per-class accuracy)\n")
    groups = {"many": test.n_many, "medium": test.n_medium, "few": test.n_few}
    typer.echo(curve_table({"param": "tau", "entries": result.curve, "chosen": result.best_tau}, groups))
    typer.echo(f"\nchosen tau = {result.best_tau:g}; test, scored once:\n")
    typer.echo(accuracy_table(groups, [(result.method, test.as_dict(), {"tau": result.best_tau})]))


def load_plugins(plugins: list[str]) -> None:
    """Import each --plugin (a .py file or a module) so that its @ltcache.method registrations run."""
    from ltcache.core.registry import load_plugin
    from ltcache.stage2 import METHODS

    METHODS.load()  # the built-ins first: a plugin that reuses a built-in name is refused
    for plugin in plugins:
        loaded = load_plugin(plugin)
        if is_main_process():
            typer.echo(f"plugin {plugin}: {loaded}", err=True)


@command("compare", options.COMPARE, arguments=[_CACHE], context=True)
def compare_cmd(ctx: typer.Context, *, cache: Path, config: Path | None, as_json: bool, **options):
    """Fit every stage-2 method, select on val, score test once; write reports/ (json, csv, md, plots).

    A comma list in --set (METHOD.lr=0.05,0.1,0.2) is a grid: every point is fitted, the best on the selection split
    is chosen and scored on test once; --ablation writes every point's numbers. --config reads a recipe's
    [compare] table; flags given on the command line win."""
    from ltcache.core.console import log
    from ltcache.core.options import compare_recipe
    from ltcache.lab import compare
    from ltcache.report import markdown_table

    if config is not None:
        explicit = {name for name in ctx.params
                    if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
        recipe = _run(compare_recipe, config)
        recipe_set = recipe.pop("set_", [])
        options.update({key: value for key, value in recipe.items() if key not in explicit})
        options["set_"] = [*recipe_set, *options["set_"]]  # the command line's --set comes last and wins
    _run(load_plugins, options.pop("plugin"))
    many, few = options.pop("many"), options.pop("few")
    params = _run(parse_params, options.pop("set_"), later_wins=config is not None)
    comparison = _run(lambda: compare(cache, params=params, thresholds=_thresholds(many, few), log=log,
                                      **options))
    if not is_main_process():  # under torchrun, the tables and paths come from rank 0 only
        return
    if as_json:
        _echo_json(comparison.as_dict())
        return
    typer.echo(markdown_table(comparison.as_dict()))
    typer.echo(f"\nselected on {options['select']}; reports in {Path(comparison.reports['results.md']).parent}")
    if "earlier" in comparison.reports:
        typer.echo(f"the earlier comparison there is kept in {comparison.reports['earlier']}")


@command("matrix", _matrix_params())
def matrix_cmd(**options):
    """Extract and compare every backbone x dataset pair in one command, then one report over all of them.

    Each pair gets a cache in OUT/caches; OUT/report holds the page, the merged results.csv and clip_benchmark.csv
    (CLIP_benchmark-style rows). Run the same command again after a kill: finished pairs are skipped and a killed
    extract continues where it stopped."""
    from ltcache.cli.matrix import run_matrix

    result = _run(run_matrix, **options)
    typer.echo(f"report: {result['report']['index.html']}")


@command("report", options.REPORT,
         arguments=[Param("inputs", list, None, "Caches (or compare --out folders) that ltcache compare wrote.")])
def report_cmd(*, inputs: list[str], out: Path, by: str | None, title: str | None, overwrite: bool):
    """One self-contained HTML page (and merged results.md / results.csv) for one or many compared caches: the
    methods x inputs table with 95% intervals, per-class accuracy against train count, weight norms, tau curves,
    reliability, shifted priors and provenance. Inputs that differ by stage-1 sampler (or --by) are grouped."""
    from ltcache.report import build_report

    paths = _run(build_report, inputs, out, by=by, title=title, overwrite=overwrite)
    typer.echo(f"report: {paths['index.html']}")


@command("methods", options.METHODS_LIST)
def methods_cmd(*, as_json: bool, markdown: str | None, plugin: list[str]):
    """List the stage-2 methods: each one's card (paper, official code, deviations, reference test) and its
    hyperparameters with type, range and default (override with compare --set)."""
    from ltcache.cli.reference import methods_reference, methods_table
    from ltcache.stage2 import METHODS, method_names

    if as_json and markdown is not None:
        _run(_raise, "pass --json or --markdown, not both")
    _run(load_plugins, plugin)
    names = method_names()
    if markdown is not None:
        render = methods_table if markdown == "table" else methods_reference
        typer.echo(render(names, dict(METHODS.items())), nl=False)
        return
    listing = []
    for name in names:
        entry = METHODS[name]
        listing.append({
            "method": name, "in_default_compare": entry.paper is not None, "summary": entry.summary,
            "paper_row": entry.paper, "stochastic": entry.stochastic, "selection_curve": entry.curve,
            "weight_norm_plot": entry.weight_norms, "analyses": sorted(entry.analyses),
            "needs_text_head": entry.text,
            "card": entry.card.as_dict() if entry.card is not None else None,
            "defaults": entry.defaults,
            "hyperparameters": {p.name: {"default": p.default, "effective_default": p.shown_default(),
                                         "allowed": p.describe(), "help": p.help}
                                for p in entry.params}})
    if as_json:
        _echo_json(listing)
        return
    for entry in listing:
        mark = "*" if entry["in_default_compare"] else " "
        text = " [needs a cache extracted with --zero-shot]" if entry["needs_text_head"] else ""
        typer.echo(f"{mark} {entry['method']:<12} {entry['summary']}{text}")
        card = entry["card"]
        if card is None:
            typer.echo(f"{'':15}card: not declared; no reference test")
        else:
            typer.echo(f"{'':15}paper: {card['paper']}; official code: {card['code'] or 'none published'}")
            typer.echo(f"{'':15}{len(card['deviations'])} deviation(s) from it (ltcache methods --markdown "
                       "reference); reference test: " + (card["reference_test"] or "none"))
        for key, about in entry["hyperparameters"].items():
            shown = about["effective_default"] or _short(about["default"])
            typer.echo(f"{'':15}{key}={shown}  ({about['allowed']})")
    typer.echo("\n* run by default; `ltcache compare CACHE --methods all` runs every method.")


def _short(value) -> str:
    if isinstance(value, tuple) and len(value) > 4:
        return f"{value[0]:g}..{value[-1]:g} ({len(value)} values)"
    return str(value)


def registered(kind: str) -> list[tuple[str, str]]:
    """(name, one-line description) of every registered dataset, sampler, loss or backbone."""
    from ltcache.stage1.config import _losses, _samplers

    def summary(obj) -> str:
        return " ".join(((getattr(obj, "__doc__", None) or "").split("\n\n")[0]).split())

    if kind == "datasets":
        from ltcache.data.spec import DATASETS

        return [(name, summary(DATASETS[name])) for name in DATASETS]
    if kind == "samplers":
        samplers = _samplers()
        return [(name, summary(samplers[name])) for name in samplers]
    if kind == "losses":
        losses = _losses()
        return [(name, summary(losses[name][0]) + (" Parameters: " + ", ".join(p.name for p in losses[name][1])
                                                    if losses[name][1] else "")) for name in losses]
    from ltcache.stage1.models import BACKBONES, torchvision_classifiers

    own = [(name, "ltcache's own: " + summary(BACKBONES[name])) for name in BACKBONES]
    return own + [(name, "torchvision") for name in torchvision_classifiers() if name not in BACKBONES] + [
        ("timm:NAME", "extract only: a frozen timm model (pip install 'ltcache[timm]')"),
        ("open_clip:ARCH/TAG", "extract only: a frozen OpenCLIP model (pip install 'ltcache[open_clip]')")]


@command("list", options.LISTS[1:], arguments=options.LISTS[:1])
def list_cmd(*, kind: str | None, as_json: bool):
    """List the registered datasets, stage-1 samplers, losses and backbones (the methods: ltcache methods)."""
    kinds = [kind] if kind else list(options.LIST_KINDS)
    listing = {name: [{"name": n, "summary": text} for n, text in _run(registered, name)] for name in kinds}
    if as_json:
        _echo_json(listing)
        return
    for name, entries in listing.items():
        typer.echo(f"{name}:")
        width = max(len(e["name"]) for e in entries)
        for entry in entries:
            typer.echo(f"  {entry['name']:<{width}}  {entry['summary']}".rstrip())


@command("info", options.INFO, arguments=[_CACHE])
def info_cmd(*, cache: Path, verify: bool, as_json: bool):
    """A short summary of a cache: dataset, splits, feature dim, class counts, backbone, fitted heads."""
    from ltcache.lab import info

    summary = _run(info, cache, verify=verify)
    if as_json:
        _echo_json(summary)
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>18}: {value}")
    if verify and summary["problems"]:
        count = len(summary["problems"])
        _run(_raise, f"{count} problem(s) in {cache}: {summary['problems'][0]}")


@command("import-features", config.IMPORT_FEATURES)
def import_features_cmd(*, out: Path, **options):
    """Build a cache from features computed elsewhere (CLIP, DINOv2, timm, ...); the manifest marks them imported."""
    from ltcache.stage1.import_features import import_features

    cache = _run(import_features, out, **options)
    typer.echo(f"cache: {cache}")


@command("inat-splits", config.INAT_SPLITS,
         arguments=[Param("json_dir", Path, None, "Folder with iNaturalist 2018's train2018.json and val2018.json.")])
def inat_splits_cmd(*, json_dir: Path, out: Path, overwrite: bool):
    """Turn the iNaturalist 2018 json files into the split files that --dataset inat2018 reads."""
    from ltcache.data.files import inat_json_to_split_files

    for split, path in _run(inat_json_to_split_files, json_dir, out, overwrite=overwrite).items():
        typer.echo(f"{split}: {path}")


@command("demo", config.DEMO)
def demo_cmd(*, out: Path | None, **options):
    """digits-LT end to end on a CPU: train a small ResNet, cache features, compare every classifier."""
    from ltcache.cli.demo import fresh_folder, run_demo
    from ltcache.report import markdown_table

    folder = out if out is not None else fresh_folder(Path("ltcache-demo"))
    comparison, seconds = _run(run_demo, folder, **options)
    typer.echo(markdown_table(comparison.as_dict()))
    typer.echo(f"\ndigits-LT demo done in {seconds} s; selected on val, test scored once.")
    for name in ("index.html", "results.md", "weight_norms.png", *(f"{curve}.png" for curve in comparison.curves)):
        typer.echo(f"  {name}: {comparison.reports[name]}")


def main() -> None:
    """The console entry point: usage mistakes are one-line errors (exit 2) like every other bad input."""
    debug = "--debug" in sys.argv
    set_interface("cli")
    try:
        result = app(standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors, as typer's public base class carries them
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(0)
        context = getattr(exc, "ctx", None)
        command_path = context.command_path if context else "ltcache"
        typer.echo(f"error: {one_line(exc.format_message()).rstrip('.')}; see {command_path} --help", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug, not bad input: keep it to one line unless --debug
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (re-run with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)
