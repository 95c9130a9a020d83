"""ltcache report: the merged page, tables and CSV over several compared caches, seeds grouped with t-intervals, the
page checked in headless Chromium, and hostile inputs (one-line errors, nothing overwritten)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, checksum, run_ltcache, write_toy_cache
from ltcache.core.errors import LtcacheError
from ltcache.lab import compare
from ltcache.report import aggregate_rows, build_report, load_results

ARTIFACTS = Path(os.environ.get("LTCACHE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
TOY_METHODS = ["joint", "ncm", "tau_norm"]


def compared_toy(path: Path, *, seed: int = 0, select: str = "val") -> Path:
    cache = write_toy_cache(path, seed=seed)
    compare(cache, methods=TOY_METHODS, select=select, seed=seed, bootstrap=50)
    return cache


def rows_of(cache: Path) -> dict[str, dict]:
    return {row["method"]: row for row in json.loads((cache / "reports" / "results.json").read_text())["rows"]}


def test_compare_writes_its_own_page(digits_run, tmp_path):
    page = digits_run["cache"] / "reports" / "index.html"
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    summary = digits_run["summary"]
    toy = compared_toy(tmp_path / "toy")  # from Python, after CLI commands ran in this process
    assert rows_of(toy) and json.loads((toy / "reports" / "results.json").read_text())["provenance"][
        "compare_command"].startswith("python ")
    assert len(summary["class_counts"]) == 10 and set(summary["weight_norms"]) >= {"joint", "tau_norm", "crt", "lws"}
    assert summary["provenance"]["train_command"].startswith("ltcache demo")
    assert all(len(row["per_class"]) == 10 for row in summary["rows"])


def test_report_merges_inputs_labels_them_and_marks_the_best(tmp_path):
    first = compared_toy(tmp_path / "a")
    second = compared_toy(tmp_path / "b", select="train")
    paths = build_report([first, second], tmp_path / "report")
    results = load_results([first, second])
    assert [r.label for r in results] == ["val", "train"]  # the inputs differ in their selection split
    table = json.loads(Path(paths["report.json"]).read_text())["table"]
    for label, cache in (("val", first), ("train", second)):
        for method, row in rows_of(cache).items():
            assert table[label][method]["all"]["mean"] == pytest.approx(row["all"])
            assert table[label][method]["all"]["ci95"] == pytest.approx(row["ci95"]["all"])  # one input: bootstrap
    lines = Path(paths["results.csv"]).read_text().splitlines()
    assert len(lines) == 1 + 2 * len(TOY_METHODS)
    page = Path(paths["index.html"]).read_text()
    best_all = max(row["all"] for cache in (first, second) for row in rows_of(cache).values())
    marked = [chunk for chunk in page.split("<td")[1:] if 'data-key="all"' in chunk and "best" in chunk.split(">")[0]]
    assert marked and all(f'<span class="v">{best_all:.2f}</span>' in chunk for chunk in marked)
    assert page.count("<img ") >= 4 and 'id="fig-groups"' in page
    assert "| Many (0 classes) | Medium (1 class) | Few (2 classes) |" in Path(paths["results.md"]).read_text()


def test_report_labels_from_fields_some_inputs_lack_or_given_outright(tmp_path):
    first, second = compared_toy(tmp_path / "a"), compared_toy(tmp_path / "b")
    results = json.loads((second / "reports" / "results.json").read_text())
    results["provenance"]["stage1_sampler"] = "class"
    (second / "reports" / "results.json").write_text(json.dumps(results))
    assert [r.label for r in load_results([first, second], by="provenance.stage1_sampler")] == ["-", "class"]
    assert [r.label for r in load_results([first, second], labels=["B+C", "LB+C"])] == ["B+C", "LB+C"]
    with pytest.raises(LtcacheError, match="1 labels for 2 inputs"):
        load_results([first, second], labels=["one"])


def test_report_treats_inputs_with_one_label_as_seeds(tmp_path):
    caches = [compared_toy(tmp_path / f"s{seed}", seed=seed) for seed in range(3)]
    results = load_results(caches, by="dataset.name")
    assert {r.label for r in results} == {"toy"}
    stats = aggregate_rows(results)["toy"]["ncm"]["few"]
    values = np.array([rows_of(cache)["ncm"]["few"] for cache in caches])
    half = 4.302652729911275 * values.std(ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["interval"] == "seeds" and stats["n"] == 3
    assert stats["ci95"] == pytest.approx([values.mean() - half, values.mean() + half])


def test_report_refuses_stale_damaged_and_unknown_inputs(tmp_path):
    cache = write_toy_cache(tmp_path / "a")
    compare(cache, methods=TOY_METHODS, bootstrap=0, out=tmp_path / "results")  # compare --out: beside the cache
    assert load_results([tmp_path / "results"])[0].manifest["generation"]
    write_toy_cache(cache, seed=5, overwrite=True)  # extracted again: the results describe the old features
    with pytest.raises(LtcacheError, match="computed on an earlier version of cache .* re-run ltcache compare"):
        load_results([tmp_path / "results"])
    with pytest.raises(LtcacheError, match="has no reports/results.json; run ltcache compare"):
        load_results([cache])
    other = compared_toy(tmp_path / "b")
    with pytest.raises(LtcacheError, match="by='backbone.nope': .* has no such field"):
        load_results([other], by="backbone.nope")
    with pytest.raises(LtcacheError, match="given twice"):
        load_results([other, other / "reports"])
    (other / "reports" / "results.json").write_text('{"rows": [{"method": "x"}]}')
    with pytest.raises(LtcacheError, match="not an ltcache results.json"):
        load_results([other])


def test_report_command_hostile_outputs_leave_everything_as_it_was(tmp_path):
    cache = compared_toy(tmp_path / "cache")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("a user's file")
    before = checksum(tmp_path)
    for args, fragments in [
        (["report", cache, "--out", theirs], ["already exists"]),
        (["report", cache, "--out", theirs, "--overwrite"], ["not an ltcache report folder"]),
        (["report", cache, "--out", cache / "reports" / "page"], ["lies inside the input"]),
        (["report", tmp_path / "missing", "--out", tmp_path / "new"], ["does not exist"]),
        (["report", theirs, "--out", tmp_path / "new"], ["has no reports/results.json", "ltcache compare"]),
        (["report", cache, "--out", tmp_path / "new", "--by", "nope"], ["--by nope"]),
    ]:
        assert_one_line_error(run_ltcache(args, cwd=tmp_path), fragments)
        assert checksum(tmp_path) == before, args
    made = run_ltcache(["report", cache, "--out", tmp_path / "page"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    first = (tmp_path / "page" / "index.html").read_text()
    assert_one_line_error(run_ltcache(["report", cache, "--out", tmp_path / "page"], cwd=tmp_path), ["--overwrite"])
    again = run_ltcache(["report", cache, "--out", tmp_path / "page", "--overwrite", "--title", "second"],
                        cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    second = (tmp_path / "page" / "index.html").read_text()
    assert "<title>second</title>" in second and "<title>second</title>" not in first


NAMED = ("Ankle boot", "T-shirt/top", "Sneaker & sandal")  # names with a slash and an ampersand, as real ones have


def _chromium():
    from cdp import find_chromium

    executable = find_chromium()
    if executable is None:
        if os.environ.get("LTCACHE_REQUIRE_CHROMIUM"):  # CI sets it: there the check must run, not skip
            pytest.fail("chromium is not installed but LTCACHE_REQUIRE_CHROMIUM is set")
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    return executable


LAYOUT = ("({scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth, "
          "figures: [...document.querySelectorAll('figure')].map(f => ({id: f.id, wide: f.classList.contains('wide'),"
          " width: f.querySelector('img').getBoundingClientRect().width, left: f.getBoundingClientRect().left})), "
          "text: document.body.innerText})")


def test_report_renders_in_headless_chromium(digits_run, tmp_path):
    from cdp import Browser

    executable = _chromium()
    toy = write_toy_cache(tmp_path / "toy", class_names=NAMED)
    compare(toy, methods=["joint", "ncm", "crt", "tau_norm"], params={"crt": {"lr": [0.05, 0.2], "weight_decay":
            [1e-4, 5e-4], "min_steps": 20}}, bootstrap=50, ablation=True)
    paths = build_report([digits_run["cache"], toy], tmp_path / "report", title="browser check")
    page = Path(paths["index.html"]).resolve()
    browser = Browser(executable, width=1280)
    try:
        session = browser.open(page.as_uri())
        cells = browser.evaluate(session, "[...document.querySelectorAll('td[data-key]')].map(td => ({"
                                          "label: td.dataset.label, method: td.dataset.method, key: td.dataset.key,"
                                          "text: td.querySelector('.v').textContent}))")
        images = browser.evaluate(session, "[...document.images].map(img => ({complete: img.complete, "
                                           "natural: [img.naturalWidth, img.naturalHeight], shown: "
                                           "[img.getBoundingClientRect().width, img.getBoundingClientRect().height]}))")
        title = browser.evaluate(session, "document.title")
        layout = browser.evaluate(session, LAYOUT)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.screenshot(session, ARTIFACTS / "report.png")
        requested = browser.requested_urls()
    finally:
        browser.close()
    browser = Browser(executable, width=1280)
    try:
        own = browser.open((toy / "reports" / "index.html").resolve().as_uri())  # compare's own page of the toy
        toy_layout = browser.evaluate(own, LAYOUT)
    finally:
        browser.close()
    assert title == "browser check"
    assert requested and all(url.startswith(("file://", "data:")) for url in requested), requested
    assert len(images) >= 5 and all(i["complete"] and min(i["natural"]) > 0 and min(i["shown"]) > 0 for i in images)
    expected = {"smallresnet8 / digits-lt": rows_of(digits_run["cache"]), "none / toy": rows_of(toy)}
    assert {c["label"] for c in cells} == set(expected)  # labelled by the fields that differ: backbone, dataset
    assert len(cells) == sum(len(rows) for rows in expected.values()) * 10
    for cell in cells:
        value = expected[cell["label"]][cell["method"]][cell["key"]]
        assert cell["text"] == ("-" if value is None else f"{value:.2f}"), cell  # None: a group with no class
    for seen in (layout, toy_layout):
        assert seen["scroll"] <= seen["client"], "the page scrolls sideways at 1280 px"
        assert seen["figures"] and all(f["width"] >= 600 for f in seen["figures"]), seen["figures"]
        assert len({round(f["left"]) for f in seen["figures"] if not f["wide"]}) == 2, "not two columns"
    for text in (layout["text"], toy_layout["text"]):
        assert all(name in text for name in NAMED), "a class name is missing from the page"
    pairs = [pair for row in rows_of(toy).values() for pair in row["confused_pairs"][:5]]
    assert pairs  # the toy's classes overlap: every method confuses some
    for pair in pairs:  # by name, with its count
        assert f"{NAMED[pair['true']]} → {NAMED[pair['predicted']]}: {pair['count']}" in toy_layout["text"]
    figures = {f["id"] for f in toy_layout["figures"]}
    assert {"fig-per_class", "fig-reliability", "fig-grid_crt", "fig-confusion_joint"} <= figures, figures
    assert "fig-groups" not in figures  # one input: no Figure 1 across labels
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
