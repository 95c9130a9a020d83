"""fashion-mnist-lt end to end on the real Debian files, with a reduced budget."""

import json

import pytest

from conftest import FASHION_AVAILABLE, invoke
from ltcache.data.profiles import exponential_profile

pytestmark = pytest.mark.skipif(
    not FASHION_AVAILABLE,
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist); CI installs it",
)


def test_fashion_mnist_lt_train_extract_compare(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    profile = ["--n-max", "200", "--imbalance-factor", "40"]
    trained = invoke("train-backbone", "--dataset", "fashion-mnist-lt", *profile, "--backbone", "smallresnet8",
                     "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--out", run)
    assert trained.exit_code == 0, trained.output
    extracted = invoke("extract", run / "checkpoint.pt", "--out", cache)
    assert extracted.exit_code == 0, extracted.output

    manifest = json.loads((cache / "manifest.json").read_text())
    expected_counts = exponential_profile(10, 200, 40)
    assert manifest["class_counts"] == expected_counts
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {
        "train": sum(expected_counts), "val": 200, "test": 10_000}
    assert manifest["class_names"][0] == "T-shirt/top" and manifest["feature_dim"] == 64

    compared = invoke("compare", cache, "--json", "--set", "crt.min_steps=200", "--set", "lws.min_steps=200")
    assert compared.exit_code == 0, compared.output
    rows = {row["method"]: row for row in json.loads(compared.stdout)["rows"]}
    # Three epochs leave the joint head ignoring the Few classes (Few = 0 for seeds 0, 1, 2). cRT and NCM,
    # which do not reuse that head, recovered them in all three seeds: Few >= 42, All >= joint + 15.
    # (tau_norm and LWS rescale the immature joint head and need the full recipe; see experiments/RESULTS.md.)
    for method in ("crt", "ncm"):
        assert rows[method]["few"] > rows["joint"]["few"] + 20.0, (method, rows[method]["few"])
        assert rows[method]["all"] > rows["joint"]["all"] + 8.0, (method, rows[method]["all"])
    for method, row in rows.items():
        assert row["all"] > 15.0, (method, row["all"])  # chance is 10% on the 10,000 balanced test images
