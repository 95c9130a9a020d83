"""The built-in stage-2 methods, one module per family. Every module in this package is imported when the method
registry is first used, so a new built-in method is one module here with one `@method(...)` registration.

None of these modules imports torch at import time: the registry's names and metadata (`ltcache methods`) cost
no torch start-up; the fit functions import it when they run.
"""

import importlib
import pkgutil

# The methods that reuse W, then the re-trained ones, then any other module: `--methods all` lists them in this order.
_FIRST = ("weight_norms", "retrain")
for _name in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)):
    importlib.import_module(f"{__name__}.{_name}")
