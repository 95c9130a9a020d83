"""Stage 2, the classifier lab: the method registry, what a method sees and returns, and the built-in methods
(registered on first use of the registry). Stage 2 imports nothing from stage 1."""

from ltcache.heads import Head, LinearHead
from ltcache.stage2.cards import Card, Deviation
from ltcache.stage2.core import (
    METHODS,
    Figure,
    Fitted,
    LabData,
    Method,
    fit_method,
    method,
    method_names,
    paper_methods,
    resolve_method_list,
    resolve_params,
    with_defaults,
)

__all__ = ["METHODS", "Card", "Deviation", "Figure", "Fitted", "Head", "LabData", "LinearHead", "Method", "fit_method",
           "method", "method_names", "paper_methods", "resolve_method_list", "resolve_params", "with_defaults"]
