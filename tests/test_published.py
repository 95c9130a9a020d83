"""Every number we publish is produced by a command and checked here.

- The README's and experiments/*.md's tables are include blocks of files that a command wrote (experiments/studies.py
  --publish, docs/generate.py); each block must equal its file, and the generated method pages must equal what the
  registry renders now.
- Each published study table must be what its own data (STUDY.json, the runs' numbers) renders to.
- A verdict states its interval: every "x [lo, hi] (resolved | not resolved)" says "resolved" exactly when the
  interval excludes 0, and such a verdict in prose (outside the include blocks) must be a cell of a published table.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "experiments" / "reports"
# a verdict may wrap across lines in prose: any run of whitespace between its parts
VERDICT = re.compile(r"([+-]\d+\.\d+)\s+\[([+-]\d+\.\d+),\s+([+-]\d+\.\d+)\]\s+\((resolved|not\s+resolved)\)")
MEAN_INTERVAL = re.compile(r"\d+\.\d+\s+±\s+\d+\.\d+")


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def load(relative: str):
    spec = importlib.util.spec_from_file_location(f"ltcache_{Path(relative).stem}", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = load("docs/generate.py")


def test_generated_pages_and_include_blocks_are_current():
    stale = GENERATE.refresh_documents(check=True)
    assert not stale, f"stale: {stale}; run python docs/generate.py"


def test_the_readme_includes_the_method_table_and_the_tutorial_the_fashion_mnist_table():
    readme = (ROOT / "README.md").read_text()
    assert "docs/reference/methods-table.md" in [path for path, _ in GENERATE.includes(readme)]
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    assert "../experiments/reports/fashion-mnist-lt/headline.md" in [path for path, _ in GENERATE.includes(tutorial)]
    assert "docs/tutorial.md" in GENERATE.DOCUMENTS and "docs/reference/cli.md" not in GENERATE.DOCUMENTS
    for name in GENERATE.DOCUMENTS:
        for path, body in GENERATE.includes((ROOT / name).read_text()):
            assert (ROOT / name).parent.joinpath(path).is_file(), (name, path)
            assert body.strip(), (name, path)


def test_every_registered_method_is_in_the_readme_table():
    from ltcache.stage2 import method_names

    table = (ROOT / "docs" / "reference" / "methods-table.md").read_text()
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == method_names()


def published_folders() -> list[Path]:
    return sorted(path for path in PUBLISHED.iterdir() if path.is_dir())


@pytest.mark.parametrize("folder", published_folders(), ids=lambda p: p.name)
def test_published_tables_are_what_their_data_renders(folder):
    studies = load("experiments/studies.py")
    checked = 0
    if (folder / "headline.json").is_file():
        data = json.loads((folder / "headline.json").read_text())
        assert studies.headline_markdown(data) == (folder / "headline.md").read_text()
        assert len(data["seeds"]) >= 3  # the headline table is a mean over at least three seeds
        checked += 1
    if (folder / "findings.md").is_file():
        samplers = json.loads((folder / "samplers.json").read_text())["rows"]
        tau = json.loads((folder / "tau.json").read_text())["rows"]
        assert studies.findings_markdown(samplers, tau) == (folder / "findings.md").read_text()
        checked += 1
    assert checked, f"{folder} holds no table this test can re-render"


def verdicts(text: str) -> list[re.Match]:
    return list(VERDICT.finditer(text))


def documents() -> list[Path]:
    return [ROOT / name for name in GENERATE.DOCUMENTS] + sorted(PUBLISHED.rglob("*.md"))


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_verdict_agrees_with_its_interval(path):
    for match in verdicts(path.read_text()):
        low, high = float(match.group(2)), float(match.group(3))
        resolved = low > 0 or high < 0
        assert low <= float(match.group(1)) <= high, match.group(0)
        assert flat(match.group(4)) == ("resolved" if resolved else "not resolved"), match.group(0)


def test_numbers_in_prose_are_cells_of_published_tables():
    """A verdict or a mean ± interval quoted in prose (outside the include blocks) must be one of a published table's
    cells, so that no such number is typed; and every "(resolved)" in prose comes with its interval."""
    tables = " ".join(flat(table.read_text()) for table in PUBLISHED.rglob("*.md"))
    for name in GENERATE.DOCUMENTS:
        prose = GENERATE.INCLUDE.sub("", (ROOT / name).read_text())
        found = verdicts(prose)
        for match in found:
            assert flat(match.group(0)) in tables, (name, match.group(0))
        for match in MEAN_INTERVAL.finditer(prose):
            assert flat(match.group(0)) in tables, (name, match.group(0))
        assert flat(prose).count("resolved)") == len(found), name


def test_the_methods_command_prints_every_card_and_the_generated_pages():
    from conftest import invoke

    listing = json.loads(invoke("methods", "--json").stdout)
    assert listing and all(entry["card"]["paper"] and entry["card"]["reference_test"] for entry in listing)
    for kind, page in (("table", "methods-table.md"), ("reference", "methods.md")):
        assert invoke("methods", "--markdown", kind).stdout == (ROOT / "docs" / "reference" / page).read_text(), kind
