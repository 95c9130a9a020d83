"""Stage 2, the classifier lab: importing this package registers every method."""

from ltcache.heads import LinearHead
from ltcache.stage2 import ncm, nonlinear, retrain, weight_norms  # noqa: F401  (registration side effects)
from ltcache.stage2.core import METHODS, Fitted, LabData, fit_method, resolve_params

PAPER_ORDER = ("joint", "ncm", "crt", "tau_norm", "lws")  # Table 2's row order; later methods follow


def method_names() -> list[str]:
    """Every registered method, in the paper's order first."""
    return sorted(METHODS, key=lambda name: (PAPER_ORDER.index(name) if name in PAPER_ORDER else len(PAPER_ORDER)))


def resolve_method_list(text: str | None) -> list[str]:
    """None -> the paper's five; 'all' -> every registered method; else a comma-separated list."""
    if not text:
        return list(PAPER_ORDER)
    if text.strip() == "all":
        return method_names()
    return [m.strip() for m in text.split(",") if m.strip()]


__all__ = ["METHODS", "PAPER_ORDER", "Fitted", "LabData", "LinearHead", "fit_method", "method_names",
           "resolve_method_list", "resolve_params"]
