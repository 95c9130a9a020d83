"""Stage 2, the classifier lab: importing this package registers every method."""

from ltcache.stage2 import ncm, retrain, weight_norms  # noqa: F401  (registration side effects)
from ltcache.stage2.core import METHODS, Fitted, LabData, LinearHead, fit_method, resolve_params

PAPER_ORDER = ("joint", "ncm", "crt", "tau_norm", "lws")  # Table 2's row order; later methods follow


def method_names() -> list[str]:
    """Every registered method, in the paper's order first."""
    return sorted(METHODS, key=lambda name: (PAPER_ORDER.index(name) if name in PAPER_ORDER else len(PAPER_ORDER)))


__all__ = ["METHODS", "method_names", "Fitted", "LabData", "LinearHead", "fit_method", "resolve_params"]
