"""The README is the contract: exactly two Quickstart commands, and CI runs the second one verbatim."""

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link or image


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_the_demo_and_the_test_command():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("ltcache demo") and commands[0].startswith("pip install ")
    assert "[test]" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quickstart_commands()[1] in ci_lines
    assert "set -euo pipefail" in ci_lines
    # the default run leaves out the tests marked slow (pyproject's addopts); CI runs them after it
    assert ci_lines.index("python -m pytest -m slow") > ci_lines.index(quickstart_commands()[1])


def test_the_readme_guides_in_at_most_200_lines_and_every_link_of_it_and_the_docs_resolves():
    """The README guides; the reference lives in docs/. Every relative link (and image) of the README and of every
    page under docs/ names a file that exists (an anchor after # is not checked)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 15
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
    assert LINK.findall("see [x](no-such-file.md) and ![y](a/b.png)") == ["no-such-file.md", "a/b.png"]


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "ltcache", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train-backbone", "extract", "compare", "sweep-tau", "info", "demo"):
        assert command in result.stdout


def test_every_recipe_loads_and_validates():
    from ltcache.stage1.config import train_config_from

    recipes = sorted((ROOT / "experiments").glob("*.toml"))
    assert len(recipes) == 9
    for recipe in recipes:
        cfg = train_config_from({}, recipe=recipe).resolved()
        cfg.validate()
        assert cfg.out.startswith("runs/")
        assert cfg.batch_size % 8 == 0  # splits evenly across 1, 2, 4 or 8 torchrun processes
        assert recipe.stem in (ROOT / "experiments" / "README.md").read_text()
        if "cls_lws.yaml" in recipe.read_text():  # "as the official LWS": it scales the bias (TauNormClassifier.py)
            assert "lws.with_bias=true" in tomllib.loads(recipe.read_text())["compare"]["set"], recipe.name


def test_flags_win_over_the_recipe_and_unknown_keys_fail(tmp_path):
    import pytest

    from ltcache.core.errors import LtcacheError
    from ltcache.stage1.config import train_config_from

    recipe = ROOT / "experiments" / "inat2018_resnet50_200.toml"
    cfg = train_config_from({"epochs": 3, "batch_size": 128}, explicit={"epochs"}, recipe=recipe)
    assert cfg.epochs == 3  # given on the command line
    assert cfg.batch_size == 512 and cfg.weight_decay == 1e-4  # from the recipe (128 was only a default)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 3\n")
    with pytest.raises(LtcacheError, match="unknown key 'epochz'"):
        train_config_from({}, recipe=bad)


def test_the_digits_recipe_is_the_demo():
    from ltcache.cli.demo import DEMO_EPOCHS, DEMO_RECIPE
    from ltcache.stage1.config import train_config_from

    cfg = train_config_from({}, recipe=ROOT / "experiments" / "digits_lt.toml")
    assert {key: getattr(cfg, key) for key in DEMO_RECIPE} == DEMO_RECIPE
    assert cfg.epochs == DEMO_EPOCHS
