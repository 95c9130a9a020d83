"""The architecture, checked: stage 2 imports nothing from stage 1, the commands that need no tensors import no
torch, and no method is named outside the registry."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import write_toy_cache

SRC = Path(__file__).resolve().parent.parent / "src" / "ltcache"
STAGE1 = ("ltcache.train", "ltcache.config", "ltcache.data", "ltcache.models", "ltcache.losses", "ltcache.extract")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_stage2_and_open_lab_leave_stage1_torchvision_and_pil_out(tmp_path):
    cache = write_toy_cache(tmp_path / "c")
    loaded = _modules_after(f"import ltcache.stage2\nfrom ltcache.lab import open_lab\nlab = open_lab({str(cache)!r})\n"
                            "lab.compare(['joint', 'tau_norm'], bootstrap=0)")
    assert "torch" in loaded  # the lab did run
    assert not {"torchvision", "PIL"} & loaded
    assert not {m for m in loaded if m.startswith(STAGE1)}


def test_stage2_sources_import_nothing_from_stage1():
    stage2 = [SRC / "lab.py", SRC / "heads.py", SRC / "cache.py", *(SRC / "metrics").glob("*.py"),
              *(SRC / "stage2").rglob("*.py")]
    pattern = re.compile(r"^\s*(?:from|import)\s+(ltcache\.(?:train|config|data|models|losses|extract))\b", re.M)
    offenders = {str(p.relative_to(SRC)): pattern.findall(p.read_text()) for p in stage2}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_help_info_methods_and_argument_errors_import_no_torch(tmp_path):
    cache = write_toy_cache(tmp_path / "c")
    for args in (["--help"], ["compare", "--help"], ["methods"], ["methods", "--json"], ["info", str(cache)],
                 ["compare", str(cache), "--bootstrap", "-1"], ["compare", str(cache), "--methods", "nope"],
                 ["compare", str(cache), "--set", "crt.lr=zero"], ["sweep-tau", str(cache), "--taus", "0:1e9:1e-9"],
                 ["train-backbone", "--out", str(tmp_path / "r"), "--epochs", "0"],
                 ["train-backbone", "--out", str(tmp_path / "r"), "--dataset", "nope"],
                 ["train-backbone", "--out", str(tmp_path / "r"), "--sampler", "nope"],
                 ["train-backbone", "--out", str(tmp_path / "r"), "--loss", "focal", "--loss-param", "beta=0.9"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ltcache", *args], capture_output=True,
                                text=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert result.returncode in (0, 2), (args, result.stderr[-500:])
        assert "torch" not in imported, args
    assert not (tmp_path / "r").exists()


def test_report_page_is_built_without_torch(tmp_path):
    from ltcache.lab import compare

    cache = write_toy_cache(tmp_path / "c")
    compare(cache, methods=["joint", "tau_norm"], bootstrap=0)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ltcache", "report", str(cache), "--out",
                             str(tmp_path / "page")], capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0, result.stderr[-500:]
    assert "matplotlib" in imported and "torch" not in imported
    assert (tmp_path / "page" / "index.html").is_file()


def test_no_method_is_named_in_lab_report_or_cli():
    """`grep -w NAME` finds no registered method's name in these files, in code or in prose."""
    from ltcache.stage2 import method_names

    for path in (SRC / "lab.py", SRC / "report.py", SRC / "htmlreport.py", SRC / "cli.py"):
        text = path.read_text()
        named = [name for name in method_names() if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
        assert named == [], f"{path.name} names {named}"
    assert re.search(r"(?<!\w)tau_norm(?!\w)", (SRC / "stage2" / "methods" / "weight_norms.py").read_text())


def test_writing_reports_leaves_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend stays what it was after Lab.save and ltcache report: every figure has its own Agg
    canvas, and pyplot is never imported."""
    cache = write_toy_cache(tmp_path / "c")
    code = (f"import matplotlib, sys\nmatplotlib.use('svg')\nfrom ltcache.lab import compare\n"
            f"from ltcache.htmlreport import build_report\n"
            f"compare({str(cache)!r}, methods=['joint', 'tau_norm'], bootstrap=0)\n"
            f"build_report([{str(cache)!r}], {str(tmp_path / 'page')!r})\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg", "False"]
    assert (cache / "reports" / "weight_norms.png").stat().st_size > 1000
