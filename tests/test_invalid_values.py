"""Invalid values generated from every declaration (as scikit-learn's `generate_invalid_param_val` does), so that an
option, recipe key, hyperparameter, loss or plugin parameter is covered the day it is declared.

For each declared `Param`: below and above its range, NaN and +-inf, a 400-digit number, a wrong type and an empty
string. Each goes through the real entry point (`ltcache.cli.main`, in this process for speed: hundreds of cases)
and must end in exit code 2 with one `error:` line naming the parameter, no traceback, and nothing written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from ltcache.cli import main
from ltcache.core import options
from ltcache.core.params import GRID, Param
from ltcache.stage1 import config
from ltcache.stage1.losses import LOSSES
from ltcache.stage2 import METHODS

HUGE = "9" * 400


def invalid_texts(param: Param) -> list[str]:
    """Command-line texts that the declaration `param` must refuse."""
    if param.type is bool:
        return ["maybe", "2", "yes please", *([] if param.optional else [""])]
    if param.type is str:
        if param.choices is None or callable(param.choices):
            return []  # a free string (a device, a title) or a registry name (checked against the registry)
        return ["not-a-choice", "NAN", *([] if param.optional else [""])]
    if param.type not in (int, float, GRID):
        return []  # paths and lists: their checks are about files, covered by the hostile matrix
    texts = ["nan", "inf", "-inf", HUGE, f"-{HUGE}", "abc", *([] if param.optional else [""])]
    if param.type is int:
        texts.append("1.5")
    for bound in (param.low, param.above):
        if bound is not None:
            texts.append(_num(bound - 1 if param.type is int or bound == param.low else bound))
    for bound in (param.high, param.below):
        if bound is not None:
            texts.append(_num(bound + 1 if param.type is int or bound == param.high else bound))
    if param.type == GRID:
        texts += ["0,nan", "1e400", "0:1:0", ",,"]
    return texts


def invalid_values(param: Param) -> list:
    """Python values (a recipe's or the API's) that the declaration must refuse: the texts' values, wrong types."""
    values: list = [math.nan, math.inf, -math.inf, int(HUGE), "3", [], {}]
    if param.type is bool:
        return ["no", 0, 1, None if not param.optional else "maybe"]
    if param.type is str and param.choices is not None and not callable(param.choices):
        return ["not-a-choice", 3, True, *([] if param.optional else [None])]
    if param.type is int:
        values += [1.5, True]
    if param.type not in (int, float, GRID):
        return []
    for bound in (param.low, param.above):
        if bound is not None:
            values.append(bound - 1 if param.type is int or bound == param.low else bound)
    for bound in (param.high, param.below):
        if bound is not None:
            values.append(bound + 1 if param.type is int or bound == param.high else bound)
    if param.type == GRID:
        values = [[math.nan], [0, math.inf], [], ["a"], [int(HUGE)], "abc", 3,
                  *([[param.low - 1]] if param.low is not None else []),
                  *([[param.high + 1]] if param.high is not None else [])]
    return values


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ----------------------------------------------------------------------------- every declaration, by surface

COMMANDS = {  # each command's declarations, and the smallest valid rest of its command line
    "train-backbone": ([*config.TrainConfig.options().values(), *config.TRAIN_EXTRA], ["--out", "NEW/run"]),
    "extract": (config.EXTRACT, ["--out", "NEW/cache"]),
    "sweep-tau": (options.SWEEP_TAU, ["NEW/missing-cache"]),
    "compare": (options.COMPARE, ["NEW/missing-cache"]),
    "report": (options.REPORT, ["NEW/missing-cache", "--out", "NEW/page"]),
    "methods": (options.METHODS_LIST, []),
    "info": (options.INFO, ["NEW/missing-cache"]),
    "import-features": (config.IMPORT_FEATURES, ["--out", "NEW/c", "--train", "NEW/t.npz", "--test", "NEW/t.npz"]),
    "inat-splits": (config.INAT_SPLITS, ["NEW/json", "--out", "NEW/s"]),
    "demo": (config.DEMO, ["--out", "NEW/demo"]),
}


def option_cases() -> list:
    cases = []
    for command, (params, rest) in COMMANDS.items():
        for param in params:
            if param.type is bool or param.type is dict:
                continue  # flags take no value
            for text in invalid_texts(param):
                cases.append(pytest.param(command, param, text, rest, id=f"{command}{param.flag}={text[:12]}"))
    return cases


def method_cases() -> list:
    cases = []
    for name, entry in METHODS.items():
        for param in entry.params:
            for text in invalid_texts(param):
                cases.append(pytest.param(name, param, text, id=f"{name}.{param.name}={text[:12]}"))
    return cases


def loss_cases() -> list:
    cases = []
    for name, (_, params) in LOSSES.items():
        for param in params:
            for text in invalid_texts(param):
                cases.append(pytest.param(name, param, text, id=f"{name}:{param.name}={text[:12]}"))
    return cases


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ltcache", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith(("error: ", "internal error")) for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NEW").mkdir()
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_every_declaration_has_generated_invalid_values():
    """Every numeric, boolean and choice declaration yields invalid values: none is left without a check."""
    declared = [p for params, _ in COMMANDS.values() for p in params]
    declared += [p for _, entry in METHODS.items() for p in entry.params]
    declared += [p for _, (_, params) in LOSSES.items() for p in params]
    for param in declared:
        if param.type in (int, float, GRID, bool) or (param.type is str and isinstance(param.choices, tuple)):
            assert invalid_texts(param), param
            assert invalid_values(param), param
        if param.type is int:  # a 400-digit integer must be out of range, so every integer has an upper bound
            assert param.high is not None or param.below is not None, f"{param.name} has no upper bound"
    assert len(option_cases()) > 150 and len(method_cases()) > 200


@pytest.mark.parametrize("command, param, text, rest", option_cases())
def test_every_option_refuses_generated_invalid_values(command, param, text, rest, workspace, monkeypatch, capsys):
    code, err = run_main([command, *rest, param.flag, text], monkeypatch, capsys)
    assert_refused(code, err, param.flag)
    assert _listing(workspace) == ["NEW"], "a refused command wrote something"


@pytest.mark.parametrize("method, param, text", method_cases())
def test_every_hyperparameter_refuses_generated_invalid_values(method, param, text, workspace, monkeypatch, capsys):
    args = ["compare", "NEW/missing-cache", "--methods", method, "--set", f"{method}.{param.name}={text}"]
    code, err = run_main(args, monkeypatch, capsys)
    if text == "" and param.type == GRID:
        assert_refused(code, err)  # an empty grid
    else:
        assert_refused(code, err, f"{method}.{param.name}")


@pytest.mark.parametrize("loss, param, text", loss_cases())
def test_every_loss_parameter_refuses_generated_invalid_values(loss, param, text, workspace, monkeypatch, capsys):
    code, err = run_main(["train-backbone", "--out", "NEW/run", "--loss", loss, "--loss-param", f"{param.name}={text}"],
                         monkeypatch, capsys)
    assert_refused(code, err, param.name)
    assert _listing(workspace) == ["NEW"]


def recipe_cases() -> list:
    cases = []
    for param in config.TrainConfig.options().values():
        if param.type is dict or param.name == "out":
            continue
        for value in invalid_values(param):
            if _toml(value) is not None:  # None has no TOML spelling: a key left out is its default
                cases.append(pytest.param("train", param, value, id=f"train.{param.name}={str(value)[:12]}"))
    for param in options.COMPARE:
        if param.name in {"set_", "plugin", "config", "out", "as_json", "device", "memory_budget", "methods"}:
            continue
        for value in invalid_values(param):
            if _toml(value) is not None:
                cases.append(pytest.param("compare", param, value, id=f"compare.{param.name}={str(value)[:12]}"))
    return cases


def _toml(value) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        parts = [_toml(v) for v in value]
        return None if None in parts else "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        return "{}"
    return None  # None has no TOML form: a key left out is the default


@pytest.mark.parametrize("table, param, value", recipe_cases())
def test_every_recipe_key_refuses_generated_invalid_values(table, param, value, workspace, monkeypatch, capsys):
    text = _toml(value)
    recipe = workspace / "NEW" / "recipe.toml"
    if table == "train":
        recipe.write_text(f'[train]\nout = "NEW/run"\n{param.name} = {text}\n')
        args = ["train-backbone", "--config", str(recipe)]
    else:
        recipe.write_text(f"[compare]\n{param.name} = {text}\n")
        args = ["compare", "NEW/missing-cache", "--config", str(recipe)]
    code, err = run_main(args, monkeypatch, capsys)
    assert_refused(code, err)
    assert "missing-cache" not in err.splitlines()[-1], "the value was accepted and the command went on"
    assert _listing(workspace) == ["NEW", "NEW/recipe.toml"]


PLUGIN = '''
import ltcache
from ltcache.core.params import Param

@ltcache.method("declared_plugin", Param("width", int, 4, "a width", low=1, high=64),
                Param("rate", float, 0.1, "a rate", above=0, below=1),
                Param("mode", str, "a", "a mode", choices=("a", "b")),
                Param("flag", bool, False, "a flag"), summary="a plugin with declared parameters")
def fit(data, *, width, rate, mode, flag):
    raise AssertionError("never fitted with an invalid value")
'''

PLUGIN_PARAMS = (Param("width", int, 4, low=1, high=64), Param("rate", float, 0.1, above=0, below=1),
                 Param("mode", str, "a", choices=("a", "b")), Param("flag", bool, False))


@pytest.mark.parametrize("param", PLUGIN_PARAMS, ids=lambda p: p.name)
def test_plugin_parameters_refuse_generated_invalid_values(param, workspace, monkeypatch, capsys):
    plugin = workspace / "NEW" / "declared_plugin.py"
    plugin.write_text(PLUGIN)
    try:
        for text in invalid_texts(param):
            code, err = run_main(["compare", "NEW/missing-cache", "--plugin", str(plugin), "--methods",
                                  "declared_plugin", "--set", f"declared_plugin.{param.name}={text}"],
                                 monkeypatch, capsys)
            assert_refused(code, err, f"declared_plugin.{param.name}")
    finally:
        METHODS.remove("declared_plugin")


@pytest.mark.parametrize("param", [p for params, _ in COMMANDS.values() for p in params
                                   if invalid_values(p)] + [p for _, e in METHODS.items() for p in e.params
                                                             if invalid_values(p)], ids=lambda p: p.name)
def test_the_python_api_refuses_the_same_values(param):
    from ltcache.core.errors import LtcacheError

    for value in invalid_values(param):
        with pytest.raises(LtcacheError) as raised:
            param.check(value)
        assert "\n" not in str(raised.value)
