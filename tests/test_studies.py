"""experiments/studies.py runs every one of the paper's studies end to end (train, extract, compare, report) at a toy
budget on digits-lt, and a second run skips everything that exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "experiments" / "studies.py"


def run_studies(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    recipe = ROOT / "experiments" / "digits_lt.toml"
    return subprocess.run([sys.executable, str(STUDIES), "all", "headline", "foundation-heads", "--recipe", str(recipe),
                           "--out", str(out),
                           "--seeds", "0,1", "--epochs", "2", "--finetune-epochs", "1", "--bootstrap", "20", *extra],
                          capture_output=True, text=True, timeout=900, env=env, cwd=out.parent)


@pytest.mark.slow
def test_every_study_runs_end_to_end_and_reruns_skip_what_exists(tmp_path):
    out = tmp_path / "studies"
    first = run_studies(out)
    assert first.returncode == 0, first.stderr[-3000:]
    samplers = json.loads((out / "samplers.json").read_text())["rows"]
    assert set(samplers) == {"instance", "class", "sqrt", "progressive"}  # labelled by the runs' own sampler
    for methods in samplers.values():
        assert set(methods) == {"joint", "ncm", "crt", "tau_norm", "lws"}
        for stats in methods.values():
            assert stats["all"]["n"] == 2 and stats["all"]["interval"] == "seeds"
            low, high = stats["all"]["ci95"]
            assert low <= stats["all"]["mean"] <= high
    finetune = json.loads((out / "finetune.json").read_text())["rows"]
    assert list(finetune) == ["Joint", "C (cRT)", "B+C", "B+C (0.1x lr)", "LB+C"]
    tuned = json.loads((out / "runs" / "ft-lbc-seed0" / "config.json").read_text())["config"]
    assert tuned["init"].endswith("instance-seed0/checkpoint.pt") and tuned["sampler"] == "class"
    assert tuned["trainable"] == "stages.2,fc" and tuned["epochs"] == 1
    slow = json.loads((out / "runs" / "ft-bc-lr0.1-seed1" / "config.json").read_text())["config"]
    base = json.loads((out / "runs" / "instance-seed1" / "config.json").read_text())["config"]
    assert slow["lr"] == base["lr"] * 0.1
    tau = json.loads((out / "tau.json").read_text())["rows"]
    assert list(tau) == ["val", "train", "train, learned"] and all(len(entry["tau"]) == 2 for entry in tau.values())
    mlp = json.loads((out / "mlp.json").read_text())["rows"]
    assert set(next(iter(mlp.values()))) == {"crt", "mlp2", "mlp3"}
    weights = json.loads((out / "sampling-weights.json").read_text())
    assert abs(sum(weights["values"]["class"]) - 1) < 1e-9 and weights["values"]["class"][0] < weights["values"][
        "instance"][0]
    for study in ("samplers", "finetune", "tau", "mlp", "headline", "foundation-heads"):
        page = (out / study / "index.html").read_text()
        assert page.count("<img ") >= 3, study
        assert "±" in (out / f"{study}.md").read_text(), study
    assert (out / "sampling-weights" / "sampling_weights.png").stat().st_size > 5000
    # The headline's table is what its data renders, with the audit of every method and tau on train and on val.
    import importlib.util

    spec = importlib.util.spec_from_file_location("studies", STUDIES)
    studies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(studies)
    headline = json.loads((out / "headline.json").read_text())
    assert studies.headline_markdown(headline) == (out / "headline.md").read_text()
    assert set(headline["optimism"]) == {"joint", "ncm", "crt", "tau_norm", "lws"}
    assert all(len(values) == 2 for values in headline["optimism"].values())
    assert headline["optimism"]["joint"] == [0.0, 0.0]  # nothing to choose: choosing on test changes nothing
    assert len(headline["tau"]["val"]) == len(headline["tau"]["train"]) == 2
    assert (out / "headline" / "weight_norms.png").is_file() and (out / "headline" / "tau_curve.png").is_file()
    # gla, gda and cos_la in their official and earlier forms on the tiny CLIP cache, per seed
    heads = json.loads((out / "foundation-heads.json").read_text())["rows"]
    assert set(heads) == {"official (today's defaults)", "earlier ltcache form"}
    for rows in heads.values():
        assert set(rows) == {"gla", "gda", "cos_la"} and all(row["all"]["n"] == 2 for row in rows.values())
    official = json.loads((out / "results" / "foundation-heads" / "tiny-clip-official-seed0" / "reports"
                           / "results.json").read_text())
    earlier = json.loads((out / "results" / "foundation-heads" / "tiny-clip-earlier-seed0" / "reports"
                          / "results.json").read_text())
    assert {r["method"]: r["chosen"]["calibrate"] for r in official["rows"] if r["method"] == "gla"} == {"gla": True}
    assert {r["method"]: r["chosen"]["calibrate"] for r in earlier["rows"] if r["method"] == "gla"} == {"gla": False}
    assert next(r for r in official["rows"] if r["method"] == "cos_la")["chosen"]["init"] == "text"

    again = run_studies(out)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("training ", "extracting ", "comparing "):
        assert step not in again.stderr, again.stderr[-3000:]
    assert json.loads((out / "samplers.json").read_text())["rows"] == samplers  # the same numbers, re-read

    # A comparison saved without the protocol audit (an earlier revision's) is not reused for the headline, which
    # needs the audit: it is compared again, and the audit is back.
    saved = out / "results" / "headline" / "instance-seed0" / "reports" / "results.json"
    results = json.loads(saved.read_text())
    for row in results["rows"]:
        row.pop("protocol_audit")
    saved.write_text(json.dumps(results))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    third = subprocess.run([sys.executable, str(STUDIES), "headline", "--recipe",
                            str(ROOT / "experiments" / "digits_lt.toml"), "--out", str(out), "--seeds", "0,1",
                            "--epochs", "2", "--bootstrap", "20"], capture_output=True, text=True, timeout=900, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "comparing joint, ncm, crt, tau_norm, lws on instance-seed0" in third.stderr
    assert "instance-seed1 (select val)" not in third.stderr  # the other seed's comparison had its audit: reused
    assert all("protocol_audit" in row for row in json.loads(saved.read_text())["rows"])
