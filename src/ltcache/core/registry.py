"""One registry style for everything that has a name: datasets, backbones, losses, samplers, stage-2 methods and
head kinds. Each entry is added where it is defined, with a decorator:

    @DATASETS.register("digits-lt")
    def build_digits_lt(spec): ...

A registry names the modules that register its built-in entries and imports them on first use, so asking a
registry for its names costs only what those modules import. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ltcache.core.errors import LtcacheError, unknown_name

T = TypeVar("T")
ALL_REGISTRIES: list[Registry] = []  # every registry made, so a plugin's registrations can be counted


@dataclass
class Registry(Generic[T]):
    """Entries of one kind by name, in registration order.

    `kind` names the kind in error messages ("dataset", "method"); `builtins` are the modules whose import
    registers the built-in entries (imported on first lookup)."""

    kind: str
    builtins: tuple[str, ...] = ()
    reserved: tuple[str, ...] = ()  # names with a meaning of their own on the command line (methods: 'all')
    entries: dict[str, T] = field(default_factory=dict, repr=False)
    _loaded: bool = field(default=False, repr=False)

    def __post_init__(self):
        ALL_REGISTRIES.append(self)

    def register(self, name: str, make: Callable[[Callable], T] | None = None, *, replace: bool = False):
        """A decorator that registers what it decorates under `name` (or `make(decorated)`, when given) and returns
        the decorated object unchanged. A name registered twice is an error unless replace=True."""
        if not isinstance(name, str) or not name.strip():
            raise LtcacheError(f"a {self.kind} needs a non-empty name, got {name!r}")

        def wrap(obj: Callable) -> Callable:
            self.add(name, make(obj) if make is not None else obj, replace=replace)
            return obj

        return wrap

    def add(self, name: str, entry: T, *, replace: bool = False) -> None:
        """Register `entry` under `name` directly (the decorator calls this)."""
        if name in self.entries and not replace:
            raise LtcacheError(f"{self.kind} {name!r} is already registered; choose another name")
        if name.strip().casefold() in {word.casefold() for word in self.reserved}:
            raise LtcacheError(f"{self.kind} name {name!r} is reserved (it has its own meaning on the command line); "
                               "choose another name")
        if name != name.strip():
            raise LtcacheError(f"{self.kind} name {name!r} has leading or trailing spaces; choose {name.strip()!r}")
        clash = next((known for known in self.entries if known.casefold() == name.casefold() and known != name),
                     None)
        if clash is not None:
            raise LtcacheError(f"{self.kind} {name!r} differs from the registered {clash!r} only by case; choose a "
                               "name that cannot be mistaken for it")
        self.entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget `name` (a user entry registered in a notebook, say)."""
        self.entries.pop(name, None)

    def load(self) -> None:
        """Import the modules that register the built-in entries (once). User code that registers entries calls
        this first, so that a name clashing with a built-in one is refused at once."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtins:
            importlib.import_module(module)

    def get(self, name: str) -> T:
        """The entry named `name`; an unknown name is a one-line error listing the known ones."""
        self.load()
        if name not in self.entries:
            raise unknown_name(self.kind, name, self.entries)
        return self.entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self.entries))

    def __len__(self) -> int:
        self.load()
        return len(self.entries)

    def names(self) -> list[str]:
        self.load()
        return list(self.entries)

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return list(self.entries.items())


def _registered() -> int:
    return sum(len(registry.entries) for registry in ALL_REGISTRIES)


def load_plugin(spec: str) -> str:
    """Import user code that registers entries: a path to a .py file or a dotted module name. Returns the file that
    was loaded. Errors (missing file, a syntax error, an exception at import) are one line naming the plugin, and so
    is a plugin that registers nothing (`--plugin json` names the standard library's json, not ./json.py: the
    error says which file it was, and how to pass the local one)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(spec)
    before = _registered()
    try:
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise LtcacheError(f"--plugin {spec}: no such file; pass a .py file or an importable module name")
            name = f"ltcache_plugin_{abs(hash(str(path.resolve())))}"
            if name in sys.modules:
                return str(path.resolve())
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise LtcacheError(f"--plugin {spec} cannot be loaded as a Python module; pass a .py file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            loaded, fresh = str(path.resolve()), True
        else:
            fresh = spec not in sys.modules
            module = importlib.import_module(spec)
            loaded = str(getattr(module, "__file__", None) or spec)
            if not fresh and not getattr(module, "_ltcache_plugin_registered", False):
                fresh = True  # imported before (by Python or ltcache itself), never as a plugin: it must register
        if fresh and _registered() == before:
            local = Path(f"{spec.replace('.', '/')}.py")
            hint = (f"; to load {local} in this folder, pass --plugin ./{local}" if local.is_file() and
                    local.resolve() != Path(loaded).resolve() else "")
            raise LtcacheError(f"--plugin {spec} loaded {loaded}, which registered nothing (no @ltcache.method, "
                               f"loss, dataset, ...){hint}")
        module._ltcache_plugin_registered = True  # loaded again (a notebook, a second command): not refused
        return loaded
    except LtcacheError as exc:
        if str(exc).startswith("--plugin"):
            raise
        raise LtcacheError(f"--plugin {spec}: {exc}") from None
    except ModuleNotFoundError as exc:
        raise LtcacheError(f"--plugin {spec}: cannot import {exc.name!r}; pass a .py file or a module on "
                           "PYTHONPATH") from None
    except SyntaxError as exc:
        raise LtcacheError(f"--plugin {spec} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # the user's code raised while registering: say where, in one line
        raise LtcacheError(f"--plugin {spec} raised {type(exc).__name__} on import: {exc} (run with --debug "
                           "for the traceback)") from exc

