"""The architecture, checked: stage 2 imports nothing from stage 1, the commands that need no tensors import no
torch, and no method is named outside the registry."""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_toy_cache

SRC = Path(__file__).resolve().parent.parent / "src" / "ltcache"
STAGE1 = ("ltcache.stage1", "ltcache.data")

# The layers, bottom up, and what each may import of ltcache (itself included). A module's layer is its longest
# matching prefix. The tree is the architecture: a new upward arrow fails here.
CORE = {"ltcache.core"}
SHARED = CORE | {"ltcache.logits", "ltcache.heads", "ltcache.metrics", "ltcache.fitting"}
LAYERS = {
    "ltcache._version": set(),
    "ltcache.core": CORE,
    "ltcache.logits": CORE | {"ltcache.logits"},
    "ltcache.heads": CORE | {"ltcache.logits", "ltcache.heads"},
    "ltcache.metrics": CORE | {"ltcache.logits", "ltcache.metrics"},
    "ltcache.fitting": SHARED,
    "ltcache.data": CORE | {"ltcache.data"},
    "ltcache.cache": SHARED | {"ltcache.cache", "ltcache._version"},
    "ltcache.stage1": SHARED | {"ltcache.data", "ltcache.cache", "ltcache.stage1", "ltcache._version"},
    "ltcache.stage2": SHARED | {"ltcache.cache", "ltcache.stage2"},
    "ltcache.report": CORE | {"ltcache.cache", "ltcache.report"},
    "ltcache.lab": SHARED | {"ltcache.cache", "ltcache.stage2", "ltcache.report", "ltcache.lab", "ltcache._version"},
    "ltcache.cli": {"ltcache"},  # the top: anything
    "ltcache.__main__": {"ltcache.cli"},
    "ltcache": {"ltcache"},  # the package root re-exports the public API, lazily
}
# Third-party packages that only one layer may import.
OWNERS = {"h5py": "ltcache.cache", "typer": "ltcache.cli", "click": "ltcache.cli", "jinja2": "ltcache.report"}


def module_name(path: Path) -> str:
    parts = ["ltcache", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    """Every module `path` imports, wherever the import stands: top level, inside a function, under TYPE_CHECKING.
    `from package import name` counts as an import of package.name when that is a module, else of package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return frozenset(found)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer_of(name: str) -> str:
    return max((prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")), key=len)


def within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_every_module_imports_only_its_layer_and_those_below():
    assert len(MODULES) > 60  # the whole package was read
    wrong = {}
    for name, path in MODULES.items():
        allowed = LAYERS[layer_of(name)]
        ours = {m for m in imports_of(path) if within(m, ["ltcache"])}
        upward = sorted(m for m in ours if not within(m, allowed))
        if upward:
            wrong[name] = upward
    assert wrong == {}


def test_third_party_owners_h5py_typer_jinja2():
    """Only the cache reads and writes HDF5, only the command line uses typer, only the report renders templates."""
    wrong = {}
    for name, path in MODULES.items():
        for package, owner in OWNERS.items():
            if any(within(m, [package]) for m in imports_of(path)) and not within(name, [owner]):
                wrong.setdefault(name, []).append(package)
    assert wrong == {}
    mentions = {name for name, path in MODULES.items() if "h5py" in path.read_text()}  # `grep -rn h5py src/ltcache`
    assert mentions and all(within(name, ["ltcache.cache"]) for name in mentions), mentions


def test_the_public_import_paths_keep_working():
    """What people import today keeps its place: the packages' public names and the console entry point."""
    import importlib

    public = {"ltcache.cache": ["FeatureCache", "CacheWriter", "Split", "TEXT_HEAD"],
              "ltcache.lab": ["Lab", "open_lab", "compare", "info", "sweep_tau", "Comparison", "Row", "Curve"],
              "ltcache.heads": ["Head", "LinearHead", "head_kind"],
              "ltcache.metrics": ["Evaluation", "GroupAccuracy", "ShotThresholds", "Calibration"],
              "ltcache.stage2": ["METHODS", "method", "method_names", "Card", "Deviation"],
              "ltcache.data": ["DATASETS", "DatasetSpec", "build_dataset"],
              "ltcache.report": ["build_report", "load_results", "write_reports"],
              "ltcache.cli": ["main", "app"]}
    missing = [f"{module}.{name}" for module, names in public.items() for name in names
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """Zero cycles among ltcache's modules, imports inside functions and under TYPE_CHECKING included. A package's
    __init__ that re-exports its own modules is not a cycle with them: the edge from a module to its own package
    root is left out (importing ltcache.cache.reader runs ltcache/cache/__init__.py first anyway)."""
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in imports_of(path) if m in MODULES and m != name
                       and not name.startswith(m + ".")}
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


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


def test_stage2_lab_and_report_import_nothing_from_stage1_and_stage1_nothing_from_stage2():
    for name, path in MODULES.items():
        if within(name, ["ltcache.stage2", "ltcache.lab", "ltcache.report", "ltcache.cache", "ltcache.fitting"]):
            assert not {m for m in imports_of(path) if within(m, STAGE1)}, name
        if within(name, ["ltcache.stage1"]):
            assert not {m for m in imports_of(path) if within(m, ["ltcache.stage2", "ltcache.lab"])}, name


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

    for path in (SRC / "lab.py", *(SRC / "report").glob("*.py"), *(SRC / "cli").glob("*.py")):
        text = path.read_text()
        named = [name for name in method_names() if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
        assert named == [], f"{path.name} names {named}"
    assert re.search(r"(?<!\w)tau_norm(?!\w)", (SRC / "stage2" / "methods" / "weight_norms.py").read_text())


def test_writing_reports_leaves_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend stays what it was after Lab.save and ltcache report: every figure has its own Agg
    canvas, and pyplot is never imported."""
    cache = write_toy_cache(tmp_path / "c")
    code = (f"import matplotlib, sys\nmatplotlib.use('svg')\nfrom ltcache.lab import compare\n"
            f"from ltcache.report import build_report\n"
            f"compare({str(cache)!r}, methods=['joint', 'tau_norm'], bootstrap=0)\n"
            f"build_report([{str(cache)!r}], {str(tmp_path / 'page')!r})\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg", "False"]
    assert (cache / "reports" / "weight_norms.png").stat().st_size > 1000
