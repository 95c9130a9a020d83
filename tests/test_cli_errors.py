"""Bad input: one line on stderr, exit code 2, no traceback, nothing overwritten."""

import pytest
import torch

from conftest import assert_clean_error, invoke, run_ltcache


def test_wrong_dataset_root_creates_nothing(tmp_path):
    out = tmp_path / "run"
    result = invoke("train-backbone", "--dataset", "fashion-mnist-lt", "--root", tmp_path / "empty", "--out", out)
    assert_clean_error(result, "fashion-mnist idx files not found", "--root")
    assert not out.exists()


def test_corrupt_idx_file_is_named(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / stem).write_bytes(b"not an idx file")
    result = invoke("train-backbone", "--dataset", "fashion-mnist-lt", "--root", root, "--out", tmp_path / "r")
    assert_clean_error(result, "is not an idx file")


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke("train-backbone", "--out", out, "--epochs", "1")
    assert_clean_error(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("option, value, kind, hint", [
    ("--dataset", "imagenet-xl", "dataset", "choose one of"),
    ("--backbone", "resnet9000", "backbone", "did you mean resnet50"),
    ("--backbone", "resnext50_32x8d", "backbone", "did you mean resnext50_32x4d"),
    ("--sampler", "balanced-ish", "sampler", "choose one of"),
])
def test_unknown_names_list_the_choices(tmp_path, option, value, kind, hint):
    result = invoke("train-backbone", "--out", tmp_path / "run", option, value)
    assert_clean_error(result, f"unknown {kind} '{value}'", hint)
    assert not (tmp_path / "run").exists()


def test_missing_checkpoint(tmp_path):
    assert_clean_error(invoke("extract", tmp_path / "nope.pt", "--out", tmp_path / "c"), "not found")


def test_foreign_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert_clean_error(invoke("extract", tmp_path / "other.pt", "--out", tmp_path / "c"),
                       "neither an ltcache checkpoint nor a classifier-balancing one")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    assert_clean_error(invoke("extract", tmp_path / "junk.pt", "--out", tmp_path / "c"), "not a readable")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["compare", "sweep-tau", "info"])
def test_missing_cache(tmp_path, command):
    assert_clean_error(invoke(command, tmp_path / "nothing"), "not found", "ltcache extract")


def test_unreadable_manifest(toy_cache):
    (toy_cache / "manifest.json").write_text("{oops")
    assert_clean_error(invoke("compare", toy_cache), "unreadable")


def test_unknown_method_and_bad_overrides(toy_cache):
    assert_clean_error(invoke("compare", toy_cache, "--methods", "joint,magic"), "unknown method 'magic'")
    assert_clean_error(invoke("compare", toy_cache, "--set", "crt.epoch=3"), "has no hyperparameter 'epoch'")
    assert_clean_error(invoke("compare", toy_cache, "--set", "crt-epochs"), "METHOD.PARAM=VALUE")
    assert not (toy_cache / "heads").exists()


@pytest.mark.parametrize("grid, message", [
    ("", "the grid is empty"), ("-0.5,1", "each >= 0 and <= 100, at most 10,000 of them; -0.5 is not"),
    ("a,b", "is not a list"),
    ("2:0:0.1", "the grid is empty"), ("0,nan", "nan is not"), ("0:1e9:1e-9", "more than 10,000"),
])
def test_bad_tau_grids(toy_cache, grid, message):
    assert_clean_error(invoke("sweep-tau", toy_cache, f"--taus={grid}"), message)


def test_a_tau_whose_scales_leave_float32_is_refused(toy_cache):
    """The toy head's norms are 9, 3 and 1.5: tau = 40 gives 9^-40, below float32's range (the logits would be 0 and
    inf); the error names the largest usable tau, and that tau runs."""
    import math

    result = invoke("sweep-tau", toy_cache, "--taus", "0,1,40")
    assert_clean_error(result, "tau = 40 scales the classes by ||w_j||^-tau beyond float32", "use taus up to")
    limit = float(result.stderr.rsplit("use taus up to", 1)[1].strip())
    assert math.isclose(limit, 30 * math.log(10) / math.log(9), rel_tol=1e-2)
    assert invoke("sweep-tau", toy_cache, "--taus", f"0,1,{limit * 0.99:.3f}").exit_code == 0
    compare = invoke("compare", toy_cache, "--methods", "tau_norm", "--set", "tau_norm.taus=0,50", "--bootstrap", "0")
    assert_clean_error(compare, "tau = 50")


def test_select_on_train_without_val_is_fine_but_unknown_split_is_not(toy_cache):
    assert_clean_error(invoke("sweep-tau", toy_cache, "--select", "test"), "--select must be one of: val, train")


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "extract", tmp_path / "nope.pt", "--out", tmp_path / "c")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "LtcacheError"


def test_json_output_stays_valid_when_a_shot_group_is_empty(toy_cache):
    import json

    # The toy cache has 30, 12 and 3 train images: no class has more than 100, so Many is empty.
    result = invoke("sweep-tau", toy_cache, "--json", "--taus", "0,1")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["test"]["many"] is None and payload["test"]["n_many"] == 0
    assert payload["test"]["few"] is not None


def test_trainable_naming_no_parameter_and_pretrained_without_weights(tmp_path):
    out = tmp_path / "run"
    result = invoke("train-backbone", "--out", out, "--backbone", "resnet10", "--trainable", "layer9", "--epochs", "1")
    assert_clean_error(result, "--trainable 'layer9' names no parameter", "layer4")
    assert not out.exists()
    result = invoke("train-backbone", "--out", out, "--backbone", "resnet32", "--pretrained")
    assert_clean_error(result, "no pretrained weights for 'resnet32'")
    assert not out.exists()


def test_bad_target_prior_fails_before_any_head_is_written(toy_cache):
    result = invoke("compare", toy_cache, "--methods", "crt,logit_adj", "--set", "logit_adj.target=forwad:10")
    assert_clean_error(result, "target prior 'forwad:10'", "forward:F")
    assert not (toy_cache / "heads").exists()


def test_version_is_one_and_the_same_everywhere():
    """`ltcache --version`, the package, its installed metadata and CITATION.cff agree."""
    import importlib.metadata
    import re
    from pathlib import Path

    import ltcache

    done = run_ltcache(["--version"], cwd=Path(__file__).parent)
    assert done.returncode == 0 and done.stdout.strip() == f"ltcache {ltcache.__version__}"
    assert importlib.metadata.version("ltcache") == ltcache.__version__
    citation = (Path(__file__).resolve().parent.parent / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", citation, re.M).group(1) == ltcache.__version__


def test_progress_draws_a_bar_on_a_terminal_and_nothing_in_a_log_or_a_silenced_library(monkeypatch):
    """core.console.progress (ltcache's own, so core needs no typer): every item passes through either way; a
    terminal gets a bar, the count of units, the rate and the time left, a log file nothing, and nor does a
    library whose "ltcache" logger does not show INFO (a script that never configured logging)."""
    import io

    from ltcache.core.console import cli_handler, progress, progress_line, remove_cli_handler

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    batches = [list(range(4)), list(range(4)), list(range(2))]
    for stream, handler, drawn in ((Terminal(), True, True), (io.StringIO(), True, False),
                                   (Terminal(), False, False)):
        monkeypatch.setattr("sys.stderr", stream)
        if handler:
            cli_handler()
        try:
            passed = list(progress(batches, label="extract test", unit="images", per_item=len, total_units=10))
        finally:
            remove_cli_handler()
        assert passed == batches
        text = stream.getvalue()
        assert ("extract test  [####################]  10/10 images" in text) is drawn, text
        assert ("images/s" in text and "0 s left" in text) is drawn
        assert text.endswith("\n") is drawn
    assert progress_line("epoch 1", 5, 10, 2.0, "images") == ("epoch 1  [##########----------]  5/10 images  "
                                                               "2 images/s  2 s left")
    assert progress_line("extract", 1200, None, 90.0, "images") == "extract  1,200 images  13 images/s  1 min 30 s"
