"""The README is the contract: exactly two Quickstart commands, and CI runs the second one verbatim."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "ltcache", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train-backbone", "extract", "compare", "sweep-tau", "info", "demo"):
        assert command in result.stdout
