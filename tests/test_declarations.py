"""The typed declarations (params.py) and the output-folder rules (folders.py), in process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke, write_toy_cache
from ltcache.core import folders
from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, MAX_GRID_POINTS, Param, parse_grid
from ltcache.stage1.config import TrainConfig, train_config_from


@pytest.mark.parametrize("param, value, ok", [
    (Param("n", int, 1, low=1), 3, True),
    (Param("n", int, 1, low=1), 0, False),
    (Param("n", int, 1, low=1), True, False),  # a bool is not an integer
    (Param("n", int, 1, low=1), 2.0, False),
    (Param("n", int, 1, low=1), "2", False),
    (Param("x", float, 1.0, above=0), 1, True),  # an integer is a number
    (Param("x", float, 1.0, above=0), 0.0, False),
    (Param("x", float, 1.0), math.nan, False),
    (Param("x", float, 1.0), math.inf, False),
    (Param("b", bool, False), "no", False),
    (Param("b", bool, False), 0, False),
    (Param("s", str, "a", choices=("a", "b")), "c", False),
    (Param("o", float, None, optional=True), None, True),
    (Param("o", float, 1.0), None, False),
    (Param("g", GRID, (0.0,), low=0), [0, 0.5], True),
    (Param("g", GRID, (0.0,), low=0), [], False),
    (Param("g", GRID, (0.0,), low=0), [-1], False),
    (Param("g", GRID, (0.0,), low=0), [0, math.nan], False),
])
def test_check_accepts_only_the_declared_type_and_range(param, value, ok):
    if ok:
        param.check(value)
    else:
        with pytest.raises(LtcacheError, match=rf"^{param.name}\b"):  # from Python: the argument's name
            param.check(value)


@pytest.mark.parametrize("text, expected", [("true", True), ("0", False), ("Yes", True), ("off", False)])
def test_bool_text(text, expected):
    assert Param("b", bool, False).parse(text) is expected


@pytest.mark.parametrize("text", ["ture", "2", "", "falsy"])
def test_bool_typos_are_errors(text):
    with pytest.raises(LtcacheError, match="must be true or false"):
        Param("b", bool, False).parse(text)


def test_integer_text_is_strict_and_grids_are_bounded_before_they_are_built():
    assert Param("n", int, 1).parse(" 12 ") == 12
    for text in ("1.5", "1e3", "ten"):
        with pytest.raises(LtcacheError, match="must be an integer"):
            Param("n", int, 1).parse(text)
    assert parse_grid("0:1:0.25", "g") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_grid("2:0:0.1", "g") == []
    with pytest.raises(LtcacheError, match="more than 10,000"):
        parse_grid("0:1e12:1", "g")  # would be 10^12 floats; refused without allocating them
    with pytest.raises(LtcacheError, match="step > 0"):
        parse_grid("0:1:0", "g")
    with pytest.raises(LtcacheError, match="more than"):
        Param("g", GRID, (0.0,)).check(list(range(MAX_GRID_POINTS + 1)))


def test_every_train_option_is_declared_with_help_and_the_recipe_keys_are_the_declared_fields():
    declared = TrainConfig.options()
    assert "lr_rule" not in declared and "data" not in declared and "dataset" in declared
    assert {"epochs", "overwrite", "loss_params"} <= set(declared)
    assert all(param.help for param in declared.values())
    assert declared["epochs"].describe() == "an integer >= 1 and <= 100000"


def test_recipe_values_keep_their_type_and_loss_params_are_typed(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nout = "runs/x"\nloss = "focal"\nloss_params = { gamma = 2 }\nlr = 1\n')
    cfg = train_config_from({}, recipe=recipe)
    assert cfg.loss_params == {"gamma": 2.0} and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    cfg = train_config_from({"loss_param": ["gamma=3"]}, explicit={"loss_param"}, recipe=recipe)
    assert cfg.loss_params == {"gamma": 3.0}  # the flag wins, typed by the recipe's loss
    recipe.write_text('out = "runs/x"\nloss_params = { gamma = 2 }\n')
    with pytest.raises(LtcacheError, match="loss ce has no parameter 'gamma'"):
        train_config_from({}, recipe=recipe)


def test_methods_lists_each_hyperparameter_with_its_type_and_range():
    listing = json.loads(invoke("methods", "--json").stdout)
    crt = next(entry for entry in listing if entry["method"] == "crt")
    assert crt["hyperparameters"]["epochs"]["allowed"] == "an integer >= 1 and <= 100000"
    assert crt["hyperparameters"]["solver"]["allowed"] == "one of: sgd, lbfgs"
    assert crt["hyperparameters"]["lr"]["default"] is None
    text = invoke("methods").stdout
    assert "momentum=0.9  (a finite number >= 0 and < 1)" in text
    assert "taus=0..2 (21 values)  (a list of finite numbers, each >= 0 and <= 100, at most 10,000 of them)" in text


def test_python_api_values_are_checked_like_command_line_ones(toy_cache):
    from ltcache.lab import compare
    from ltcache.stage2 import resolve_params

    with pytest.raises(LtcacheError, match="crt.epochs must be an integer"):
        resolve_params("crt", {"epochs": 2.5})
    with pytest.raises(LtcacheError, match="^bootstrap must be an integer >= 0"):
        compare(toy_cache, bootstrap=-1)
    assert not (toy_cache / "heads").exists()


# ------------------------------------------------------------------------------------------------ folders


def test_overwrite_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {}, "dataset": {}}))
    with pytest.raises(LtcacheError, match="not an ltcache run folder"):
        folders.check_target(run, kind=folders.RUN, overwrite=True)  # no checkpoint: not a finished run
    (run / "checkpoint.pt").write_bytes(b"PK")
    folders.check_target(run, kind=folders.RUN, overwrite=True)  # ltcache's own: allowed
    (run / "config.json").write_text(json.dumps({"config": {"backbone": "resnet8"}, "dataset": {"name": "digits"}}))
    same = {"dataset": "digits", "backbone": "resnet8"}
    for inputs in ([], [tmp_path / "recipe.toml", None], [None, tmp_path / "root"]):  # whatever the inputs end with
        folders.check_target(run, kind=folders.RUN, overwrite=True, inputs=inputs, source=same)
        with pytest.raises(LtcacheError, match="is a run folder of dataset digits / backbone resnet8, and this "
                                               "command makes one of dataset digits / backbone resnet50"):
            folders.check_target(run, kind=folders.RUN, overwrite=True, inputs=inputs,
                                 source={**same, "backbone": "resnet50"})
    with pytest.raises(LtcacheError, match="not an ltcache cache folder"):
        folders.check_target(run, kind=folders.CACHE, overwrite=True)  # a run is not a cache
    with pytest.raises(LtcacheError, match="holds this command's input"):
        folders.check_target(run, kind=folders.RUN, overwrite=True, inputs=[run / "sub" / "recipe.toml"])
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(LtcacheError, match="symbolic link"):
        folders.check_target(tmp_path / "link", kind=folders.RUN, overwrite=True)
    with pytest.raises(LtcacheError, match="current folder"):
        folders.check_target(Path("."), kind=folders.RUN, overwrite=True)
    (tmp_path / "empty").mkdir()
    folders.check_target(tmp_path / "empty", kind=folders.CACHE, overwrite=False)  # an empty folder is fine


def test_publish_without_an_atomic_exchange_uses_two_renames(tmp_path, monkeypatch):
    old = write_toy_cache(tmp_path / "cache", seed=0)
    generation = json.loads((old / "manifest.json").read_text())["generation"]
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    write_toy_cache(tmp_path / "cache", seed=1, class_counts=(40, 10, 2), overwrite=True)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["class_counts"] == [40, 10, 2] and manifest["generation"] != generation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_failed_writer_removes_the_parents_it_made(tmp_path):
    staged = folders.StagedFolder(tmp_path / "a" / "b" / "cache", kind=folders.CACHE, overwrite=False)
    assert staged.path.is_dir() and staged.path.name == f".cache.staging-{os.getpid()}"
    staged.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_live_writer_is_seen_by_another_process(tmp_path):
    code = ("import sys; from ltcache.core import folders; from pathlib import Path; "
            "sys.exit(0 if folders.is_locked(Path(sys.argv[1])) else 1)")
    staged = folders.StagedFolder(tmp_path / "cache", kind=folders.CACHE, overwrite=False)
    try:
        assert subprocess.run([sys.executable, "-c", code, str(staged.path)]).returncode == 0
    finally:
        staged.abort()
    assert not any(tmp_path.iterdir())
    (tmp_path / "free").mkdir()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "free")]).returncode == 1


def test_train_config_nests_the_dataset_spec_and_reads_both_saved_forms():
    from dataclasses import asdict

    from ltcache.stage1.config import DatasetSpec

    cfg = TrainConfig.from_options(out="runs/x", dataset="fashion-mnist-lt", root="/data", n_max=50, seed=7, epochs=2)
    assert cfg.data == DatasetSpec(name="fashion-mnist-lt", root="/data", n_max=50, seed=7)
    assert cfg.dataset == cfg.data.name
    assert not {"root", "n_max", "dataset"} & {f for f in asdict(cfg)}  # no copies of the spec's fields
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.json as written now
    flat = {"out": "runs/x", "dataset": "fashion-mnist-lt", "root": "/data", "n_max": 50, "seed": 7, "epochs": 2,
            "world_size": 1}
    assert TrainConfig.from_dict(flat) == cfg  # config.json as ltcache 0.1 wrote it (a run resumed after upgrading)
