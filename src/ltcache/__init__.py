"""ltcache: decoupled long-tailed recognition over a cached feature store.

The Python API (each name is imported on first use, so `import ltcache` stays cheap):

    import ltcache

    lab = ltcache.open_lab("CACHE", select="val")
    fitted = lab.fit("crt", lr=0.1)
    result = lab.score(fitted)              # an Evaluation: result.all, result.few, result.calibration.ece, ...
    comparison = lab.compare(["joint", "crt", "my_head"], params={"crt": {"lr": [0.05, 0.1]}})
    ltcache.build_report(["CACHE_A", "CACHE_B"], "REPORT_DIR")   # one HTML page over compared caches

    @ltcache.method("my_head", ltcache.Param("scale", float, 1.0, "Logit scale.", above=0), summary="...",
                    card=ltcache.Card(paper="Me et al., 2026", code=None, reference_test="tests/test_mine.py::test_it"))
    def my_head(data: ltcache.LabData, *, scale: float) -> ltcache.Fitted:
        return ltcache.Fitted(ltcache.LinearHead(data.joint.weight * scale, data.joint.bias), {"scale": scale})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ltcache._version import __version__ as __version__  # re-exported: ltcache.__version__

# name -> module that defines it
_API = {
    "open_lab": "ltcache.lab", "Lab": "ltcache.lab", "compare": "ltcache.lab", "info": "ltcache.lab",
    "Comparison": "ltcache.lab", "Row": "ltcache.lab", "GridPoint": "ltcache.lab", "Curve": "ltcache.lab",
    "method": "ltcache.stage2.core", "METHODS": "ltcache.stage2.core", "Method": "ltcache.stage2.core",
    "Figure": "ltcache.stage2.core", "Fitted": "ltcache.stage2.core", "LabData": "ltcache.stage2.core",
    "method_names": "ltcache.stage2.core", "with_defaults": "ltcache.stage2.core",
    "Card": "ltcache.stage2.cards", "Deviation": "ltcache.stage2.cards",
    "TRAINING": "ltcache.fitting", "train_on_features": "ltcache.fitting",
    "planned_method": "ltcache.stage2.training", "Plan": "ltcache.stage2.training",
    "Training": "ltcache.stage2.training", "lab_training": "ltcache.stage2.training",
    "Head": "ltcache.heads", "LinearHead": "ltcache.heads", "head_kind": "ltcache.heads",
    "Evaluation": "ltcache.metrics", "GroupAccuracy": "ltcache.metrics", "Calibration": "ltcache.metrics",
    "ShotThresholds": "ltcache.metrics",
    "Param": "ltcache.core.params", "GRID": "ltcache.core.params",
    "Registry": "ltcache.core.registry", "LtcacheError": "ltcache.core.errors",
    "FeatureCache": "ltcache.cache", "extract": "ltcache.stage1.extract",
    "import_features": "ltcache.stage1.import_features",
    "build_report": "ltcache.report", "load_results": "ltcache.report",
}

__all__ = ["Calibration", "Card", "Comparison", "Curve", "Deviation", "Evaluation", "FeatureCache", "Figure", "Fitted",
           "GRID", "GridPoint", "GroupAccuracy", "Head", "Lab", "LabData", "LinearHead", "LtcacheError", "METHODS",
           "Method", "Param", "Plan", "Registry", "Row", "ShotThresholds", "TRAINING", "Training", "build_report",
           "compare", "extract", "head_kind", "import_features", "info", "lab_training", "load_results", "method",
           "method_names", "open_lab", "planned_method", "train_on_features", "with_defaults"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ltcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from ltcache.cache import FeatureCache
    from ltcache.core.errors import LtcacheError
    from ltcache.core.params import GRID, Param
    from ltcache.core.registry import Registry
    from ltcache.fitting import TRAINING, train_on_features
    from ltcache.heads import Head, LinearHead, head_kind
    from ltcache.lab import Comparison, Curve, GridPoint, Lab, Row, compare, info, open_lab
    from ltcache.metrics import Calibration, Evaluation, GroupAccuracy, ShotThresholds
    from ltcache.report import build_report, load_results
    from ltcache.stage1.extract import extract
    from ltcache.stage1.import_features import import_features
    from ltcache.stage2.cards import Card, Deviation
    from ltcache.stage2.core import METHODS, Figure, Fitted, LabData, Method, method, method_names, with_defaults
    from ltcache.stage2.training import Plan, Training, lab_training, planned_method
