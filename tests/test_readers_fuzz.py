"""One reader per input format, fuzzed: for any bytes or JSON, each reader either returns data that its consumers
can use, or raises LtcacheError (a one-line error). Never another exception, never data that fails later.

Formats: results.json (ltcache report), extract journal lines, split files, prompt templates, class-name files,
WebDataset labels, open_clip model configs, and the heads plugin methods return.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_CLIP, lab_data, write_toy_cache
from ltcache.core.errors import LtcacheError
from ltcache.core.params import MAX_CLASSES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


# ------------------------------------------------------------------------------------------- results.json


@pytest.fixture(scope="module")
def results_json(tmp_path_factory) -> dict:
    from ltcache.lab import compare

    cache = write_toy_cache(tmp_path_factory.mktemp("fuzz") / "toy")
    compare(cache, methods=["joint", "ncm", "tau_norm", "crt"], bootstrap=20,  # a grid: results.json's "grids"
            params={"crt": {"lr": [0.1, 0.2], "min_steps": 5}}, ablation=True)
    return json.loads((cache / "reports" / "results.json").read_text())


def _paths(value, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replace(document, path, new):
    if not path:
        return new
    copy = json.loads(json.dumps(document))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copy


def _write_mutated(document, data, new, file: Path) -> Path:
    """`document` with one value, anywhere in it (drawn from `data`), replaced by `new`, written to `file`."""
    path = data.draw(st.sampled_from(list(_paths(document))))
    file.write_text(_json_text(_replace(document, path, new)))
    return file


def _use_results(file: Path) -> None:
    """What ltcache report does with a results.json short of drawing: read, aggregate, tabulate, CSV."""
    from ltcache.report import Result, aggregate_rows, read_results_json, summary_table
    from ltcache.report.page import (
        _confused_context,
        _grid_context,
        _per_class_context,
        _provenance_context,
        _table_context,
    )
    from ltcache.report.tables import csv_text

    results = read_results_json(file)
    loaded = [Result(file.parent, results, label="x")]
    table = aggregate_rows(loaded)
    summary_table(table)
    _table_context(table)
    csv_text(loaded)
    for context in (_per_class_context, _confused_context, _grid_context, _provenance_context):
        context(loaded)  # the page's per-class, confusion, grid and provenance sections



@pytest.mark.parametrize("value", [True, 3, "30,12,3", [30, 12], [30, -1, 3], [30, 12.5, 3], []])
def test_provenance_class_counts_of_the_wrong_kind_are_refused(results_json, tmp_path, value):
    """A case the fuzz test below found (provenance.class_counts = true reached the page and failed there):
    provenance's class counts are a list of non-negative integers, one per class, or the file is refused."""
    document = json.loads(json.dumps(results_json))
    document["provenance"]["class_counts"] = value
    file = tmp_path / "results.json"
    file.write_text(json.dumps(document))
    with pytest.raises(LtcacheError, match="provenance 'class_counts' must be a list of non-negative integers"):
        _use_results(file)

@FUZZ
@given(data=st.data(), new=JSON)
def test_results_json_with_any_field_replaced_is_read_whole_or_refused(results_json, tmp_path, data, new):
    file = _write_mutated(results_json, data, new, tmp_path / "results.json")
    try:
        _use_results(file)
    except LtcacheError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: _json_text(v).encode()))
def test_results_json_from_any_bytes_is_read_or_refused(tmp_path, raw):
    file = tmp_path / "results.json"
    file.write_bytes(raw)
    try:
        _use_results(file)
    except LtcacheError:
        pass


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), new=JSON)
def test_results_json_that_is_read_is_drawn(results_json, tmp_path, data, new):
    """Slow (it draws every figure): what the reader accepts, the page renders."""
    from ltcache.report import Result, read_results_json, render_page

    file = _write_mutated(results_json, data, new, tmp_path / "results.json")
    try:
        results = read_results_json(file)
    except LtcacheError:
        return
    render_page([Result(tmp_path, results, label="x")])


# -------------------------------------------------------------------------------------------- journal lines

VALID_LINE = {"split": "train", "shard": 3, "file": "train/00003.h5", "rows": 5, "labels": [2, 3], "sha256": "a" * 64}


@FUZZ
@given(line=st.text(max_size=200) | JSON.map(_json_text)
       | st.sampled_from(list(VALID_LINE)).flatmap(lambda key: JSON.map(lambda v: _json_text({**VALID_LINE, key: v}))))
def test_journal_lines_are_valid_or_skipped(line):
    from ltcache.cache.journal import journal_entry

    item = journal_entry(line)
    if item is not None:
        assert item["file"] == f"{item['split']}/{item['shard']:05d}.h5" and ".." not in item["file"]
        assert sum(item["labels"]) == item["rows"] and all(v >= 0 for v in item["labels"])


# -------------------------------------------------------------------------------------------- split files


@FUZZ
@given(lines=st.lists(st.one_of(
    st.tuples(st.sampled_from(["a.jpg", "b.jpg", "sub/c.jpg", "../x.jpg", "/etc/passwd", "missing.jpg", "a b.jpg"]),
              st.one_of(st.integers(-5, 3).map(str), st.integers(-(10**20), 10**20).map(str), st.text(max_size=4)))
    .map(" ".join), st.text(max_size=20)), max_size=8), junk=st.binary(max_size=8))
def test_split_files_are_read_or_refused(tmp_path, lines, junk):
    from ltcache.data.files import read_split_file

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg", "a b.jpg"):
        (root / name).write_bytes(b"x")
    split = tmp_path / "split.txt"
    split.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    try:
        paths, labels = read_split_file(split, root)
    except (LtcacheError, UnicodeEncodeError):
        return
    labels = np.asarray(labels)
    assert len(paths) == len(labels) > 0 and labels.min() >= 0 and labels.max() < MAX_CLASSES
    assert all(Path(p).is_file() and str(Path(p).resolve()).startswith(str(root.resolve())) for p in paths)


# ------------------------------------------------------------------------------- templates and class names

SENTINEL = "\x00CLASS\x00"


@FUZZ
@given(text=st.text(alphabet=string.printable + "{}{}{}é", max_size=60), junk=st.binary(max_size=4))
def test_prompt_templates_format_one_class_name_or_are_refused(tmp_path, text, junk):
    from ltcache.stage1.hub import read_templates

    file = tmp_path / "templates.txt"
    file.write_bytes(text.encode() + junk)
    try:
        templates = read_templates(str(file))
    except LtcacheError:
        return
    assert templates
    for template in templates:
        assert template.format(SENTINEL).count(SENTINEL) == 1


@FUZZ
@given(raw=st.binary(max_size=80) | st.text(max_size=80).map(str.encode), count=st.integers(1, 6))
def test_class_name_files_give_one_name_per_class_or_are_refused(tmp_path, raw, count):
    from ltcache.core.fsutil import read_class_names

    file = tmp_path / "names.txt"
    file.write_bytes(raw)
    try:
        names = read_class_names(file, count)
    except LtcacheError:
        return
    assert len(names) == count and all(name and name == name.strip() for name in names)


# ---------------------------------------------------------------------------------------- WebDataset labels


@FUZZ
@given(extension=st.sampled_from([".cls", ".json"]),
       raw=st.binary(max_size=30) | st.integers().map(lambda v: str(v).encode())
       | JSON.map(lambda v: _json_text({"label": v}).encode()) | JSON.map(lambda v: _json_text(v).encode()))
def test_webdataset_labels_are_class_numbers_or_refused(extension, raw):
    from ltcache.data.tars import _label

    try:
        label = _label(extension, raw, "key", Path("shard.tar"))
    except LtcacheError:
        return
    assert type(label) is int and 0 <= label < MAX_CLASSES


# ---------------------------------------------------------------------------------------- open_clip configs



@FUZZ
@given(data=st.data(), new=JSON | st.integers(min_value=-(2**40), max_value=2**40))
def test_open_clip_configs_are_bounded_or_refused(tmp_path, data, new):
    from ltcache.stage1.hub import MAX_CONFIG_INT, check_open_clip_config

    file = _write_mutated(TINY_CLIP, data, new, tmp_path / "clip.json")
    try:
        config = check_open_clip_config(file)
    except LtcacheError:
        return

    def ints(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from ints(item)
        elif isinstance(value, list):
            for item in value:
                yield from ints(item)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield value

    assert all(0 <= v <= MAX_CONFIG_INT for v in ints(config))
    for tower in ("vision_cfg", "text_cfg"):
        for key in ("width", "layers"):
            value = config[tower].get(key)
            assert not isinstance(value, int) or isinstance(value, bool) or value >= 1


# -------------------------------------------------------------------------------------------- plugin heads


@pytest.fixture(scope="module")
def toy_data():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20, 4, generator=generator)
    labels = torch.arange(20) % 3
    return lab_data(torch.randn(3, 4, generator=generator), torch.zeros(3), features, labels, [10, 6, 4])


@FUZZ
@given(rows=st.integers(1, 5), cols=st.integers(1, 6), bias=st.booleans(),
       fill=st.sampled_from([0.5, -2.0, 1e30, 1e39, math.nan, math.inf, -math.inf]), poke=st.booleans())
def test_plugin_heads_are_scored_only_when_usable(toy_data, rows, cols, bias, fill, poke):
    from ltcache.heads import LinearHead
    from ltcache.stage2.core import check_head

    weight = torch.full((rows, cols), 0.1)
    if poke:  # 1e39 becomes inf in float32, as a plugin's float64 arithmetic cast down would
        weight[0, 0] = torch.tensor(fill, dtype=torch.float64).float()
    head = LinearHead(weight, torch.zeros(rows) if bias else None)
    try:
        check_head("plugin", head, toy_data)
    except LtcacheError as exc:
        assert "method plugin" in str(exc)
        return
    logits = head.logits(toy_data.train.features)
    assert logits.shape == (20, 3) and bool(torch.isfinite(logits).all())
