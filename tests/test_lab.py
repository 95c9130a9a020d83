"""Grids in compare: comma lists expand, every point is fitted and chosen on the selection split only, the ablation
table records every point, and test labels never influence a choice."""

import json
import re

import h5py
import numpy as np
import pytest

from conftest import invoke, reseal, write_toy_cache
from ltcache.core.errors import LtcacheError
from ltcache.lab import compare, expand_grids, open_lab

GRID = {"crt": {"lr": "0.05,0.1,0.2", "weight_decay": "1e-4,5e-4", "min_steps": "40"}}


def test_comma_lists_expand_into_the_cartesian_grid_and_tau_lists_stay_lists():
    grids = expand_grids(["crt", "tau_norm"], {**GRID, "tau_norm": {"taus": "0,0.5,1"}})
    assert len(grids["crt"]) == 6
    assert {(p["lr"], p["weight_decay"]) for p in grids["crt"]} == {(lr, wd) for lr in (0.05, 0.1, 0.2)
                                                                    for wd in (1e-4, 5e-4)}
    assert all(p["min_steps"] == 40 and p["epochs"] == 10 for p in grids["crt"])
    assert grids["tau_norm"] == [{"taus": (0.0, 0.5, 1.0)}]  # a GRID-typed key keeps its list: one point
    # Python lists are grids too, and every point is checked against the declaration
    assert [p["lr"] for p in expand_grids(["crt"], {"crt": {"lr": [0.1, 0.3]}})["crt"]] == [0.1, 0.3]
    with pytest.raises(LtcacheError, match=r"crt.lr must be"):
        expand_grids(["crt"], {"crt": {"lr": "0.1,-1"}})
    with pytest.raises(LtcacheError, match="values separated by commas"):
        expand_grids(["crt"], {"crt": {"lr": "0.1,,0.2"}})
    with pytest.raises(LtcacheError, match="more than 10,000"):
        expand_grids(["crt"], {"crt": {"lr": ",".join(str(0.01 * (i + 1)) for i in range(101)),
                                       "weight_decay": ",".join(str(1e-5 * (i + 1)) for i in range(100))}})


def test_the_chosen_point_is_the_best_on_selection_and_is_the_row(tmp_path):
    cache = write_toy_cache(tmp_path / "c", seed=1)
    lab = open_lab(cache)
    comparison = lab.compare(["crt"], params=GRID, bootstrap=0, ablation=True)
    row = comparison.row("crt")
    assert len(row.grid) == 6 and sum(p.selected for p in row.grid) == 1
    best = max(row.grid, key=lambda p: p.selection)
    selected = next(p for p in row.grid if p.selected)
    assert selected.selection == best.selection
    assert row.grid.index(selected) == min(i for i, p in enumerate(row.grid) if p.selection == best.selection)
    assert row.chosen["grid"]["points"] == 6 and row.chosen["lr"] == selected.params["lr"]
    # The row is the selected point refitted identically: its test accuracy equals that point's ablation entry.
    assert row.evaluation.accuracy.as_dict() == pytest.approx(selected.test.as_dict(), nan_ok=True)
    # Every point's selection score is what fitting that point alone gives.
    alone = lab.fit("crt", lr=selected.params["lr"], weight_decay=selected.params["weight_decay"], min_steps=40)
    assert lab.data.selection_score(alone.head) == selected.selection


def test_ablation_reports_and_test_labels_never_influence_the_choice(tmp_path):
    first = write_toy_cache(tmp_path / "a", seed=3)
    second = write_toy_cache(tmp_path / "b", seed=3)
    manifest = json.loads((second / "manifest.json").read_text())
    with h5py.File(second / manifest["splits"]["test"]["shards"][0]["file"], "r+") as f:
        f["labels"][:] = np.random.default_rng(0).permutation(f["labels"][:])
    reseal(second)
    grid = {"crt": {"lr": "0.01,0.1,1.0", "min_steps": "30"}, "ncm": {"metric": "cosine,euclidean"}}
    results = [compare(path, methods=["crt", "ncm"], params=grid, bootstrap=0, ablation=True)
               for path in (first, second)]
    for name in ("crt", "ncm"):
        a, b = (r.row(name) for r in results)
        assert a.chosen == b.chosen
        assert [p.selection for p in a.grid] == [p.selection for p in b.grid]
        assert [p.selected for p in a.grid] == [p.selected for p in b.grid]
    # The test numbers did change with the labels, so the test above could have failed.
    assert [p.test for p in results[0].row("crt").grid] != [p.test for p in results[1].row("crt").grid]
    reports = first / "reports"
    table = json.loads((reports / "ablation.json").read_text())
    assert len(table["points"]) == 5 and sum(p["selected"] for p in table["points"]) == 2
    assert "**yes**" in (reports / "ablation.md").read_text()
    assert (reports / "ablation.csv").read_text().count("\n") == 6
    row = next(r for r in json.loads((reports / "results.json").read_text())["rows"] if r["method"] == "crt")
    assert row["grid_points"] == 3 and row["chosen"]["grid"]["selected_on"] == "val"


def test_cli_grid_and_ablation(tmp_path):
    cache = write_toy_cache(tmp_path / "c", seed=2)
    result = invoke("compare", str(cache), "--methods", "crt,tau_norm", "--set", "crt.lr=0.05,0.2",
                    "--set", "crt.min_steps=30", "--bootstrap", "0", "--ablation")
    assert result.exit_code == 0, result.output
    assert "grid [lr=" in result.output and "of 2" in result.output
    assert (cache / "reports" / "ablation.md").is_file()
    bad = invoke("compare", str(cache), "--methods", "crt", "--set", "crt.lr=0.05,zero")
    assert bad.exit_code == 2 and "crt.lr" in bad.output


def test_protocol_audit_reports_test_chosen_numbers_and_changes_nothing(tmp_path):
    cache = write_toy_cache(tmp_path / "c", seed=4)
    lab = open_lab(cache)
    methods = ["joint", "crt", "tau_norm", "logit_adj"]
    params = {"crt": {"min_steps": "30", "lr": "0.05,0.5"}}
    plain = lab.compare(methods, params=params, bootstrap=50)
    audited = lab.compare(methods, params=params, bootstrap=50, audit=True)
    for a, b in zip(plain.rows, audited.rows, strict=True):
        first, second = a.as_dict(), b.as_dict()
        audit = second.pop("protocol_audit")
        for row in (first, second):
            row.pop("fit_seconds")
        assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # the audit fed back nothing
        honest = b.evaluation.accuracy.mean_per_class
        assert audit["optimism_mean_per_class"] == pytest.approx(
            audit["test_if_chosen_on_test"]["mean_per_class"] - honest)
        labels = re.findall(r'"selected_on": "(\w+)"', json.dumps(audit["chosen_on_test"]))
        assert set(labels) == ({"test"} if b.method != "joint" else set()), (b.method, audit["chosen_on_test"])
        if b.method == "joint":  # nothing to choose: choosing on test changes nothing
            assert audit["optimism_mean_per_class"] == 0
        if b.method == "tau_norm":  # the same tau grid, chosen on test: never worse on test
            assert audit["optimism_mean_per_class"] >= 0
    result = invoke("compare", str(cache), "--methods", "joint,tau_norm", "--protocol-audit", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert "if chosen on test" in result.output and "optimism" in (cache / "reports" / "results.md").read_text()


def test_a_compare_that_fails_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    """Heads and reports are staged and published whole: a failure while writing them (here the report writer
    raising) leaves no new --out folder, no staging folder, and an earlier comparison in the cache untouched."""
    from ltcache import report

    cache = write_toy_cache(tmp_path / "c")
    compare(cache, methods=["joint"], bootstrap=0)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    def boom(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(report, "write_reports", boom)
    for out in (tmp_path / "new" / "out", None):
        with pytest.raises(RuntimeError, match="the disk went away"):
            compare(cache, methods=["joint", "tau_norm"], bootstrap=0, out=out)
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
