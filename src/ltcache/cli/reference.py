"""The reference pages, generated from the declarations: the method table and the method cards (from the method
registry), and the command-line reference (from each command's Param declarations). docs/generate.py writes them
into docs/reference/; `ltcache methods --markdown` prints the method pages; a test fails when the committed pages
are out of date."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ltcache.core.params import Param

if TYPE_CHECKING:
    from ltcache.stage2.core import Method


@dataclass(frozen=True)
class Command:
    """A command as declared: its name, its docstring, its arguments and its options (what the generated command-line
    reference, docs/reference/cli.md, is made of)."""

    name: str
    doc: str
    arguments: tuple[Param, ...]
    params: tuple[Param, ...]


COMMANDS: dict[str, Command] = {}  # every command, in declaration order (ltcache.cli.app's `command` adds it)


def _defaults(entry: Method) -> str:
    if not entry.params:
        return "—"
    return ", ".join(f"`{param.name}={param.shown_default() or _value(param.default)}`" for param in entry.params)


def _value(value) -> str:
    if isinstance(value, (tuple, list)):
        if len(value) > 4:
            return f"{_value(value[0])},…,{_value(value[-1])} ({len(value)} values)"
        return ",".join(_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return "default" if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def methods_table(names: list[str], entries: dict[str, Method]) -> str:
    """The method table (docs/reference/methods-table.md, included in the README): name, definition, source (paper
    and official code) and defaults."""
    lines = ["| method | definition | paper · official code | defaults (override with `--set`) |",
             "|---|---|---|---|"]
    for name in names:
        entry = entries[name]
        card = entry.card
        if card is None:
            source = "no card declared"
        else:
            source = card.paper + (f" · `{card.code.split(':')[0]}`" if card.code else " · no official code")
        lines.append(f"| `{name}` | {_cell(entry.summary)} | {_cell(source)} | {_cell(_defaults(entry))} |")
    return "\n".join(lines) + "\n"


def methods_reference(names: list[str], entries: dict[str, Method]) -> str:
    """docs/reference/methods.md: every method's card and hyperparameters."""
    parts = ["# Stage-2 methods", "",
             "Generated from the method registry (`ltcache methods --markdown reference`); do not edit by hand. Each "
             "method's card gives the paper, the official code, what ltcache follows, each deviation with its reason, "
             "and the test that compares ltcache's head with an independent computation of the published method.", ""]
    for name in names:
        entry = entries[name]
        card = entry.card
        parts += [f"## `{name}`", "", entry.summary[:1].upper() + entry.summary[1:] + ".", ""]
        if card is None:
            parts += ["No card declared.", ""]
        else:
            parts.append(f"- **Paper:** {card.paper}" + (f", *{card.title}*" if card.title else "") + ".")
            parts.append(f"- **Official code:** {card.code}." if card.code else "- **Official code:** none published.")
            if card.features:
                parts.append(f"- **Features:** {card.features}")
            for item in card.matches:
                parts.append(f"- **Follows:** {item}")
            for deviation in card.deviations:
                parts.append(f"- **Differs:** {deviation.what} *Why:* {deviation.why}")
            parts.append(f"- **Reference test:** `{card.reference_test}`." if card.reference_test
                         else "- **Reference test:** none.")
            parts.append("")
        if entry.params:
            parts += ["| hyperparameter | default | allowed | meaning |", "|---|---|---|---|"]
            parts += [f"| `{p.name}` | `{p.shown_default() or _value(p.default)}` | {_cell(p.describe())} | "
                      f"{_cell(p.help)} |" for p in entry.params]
            parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"


def _flag(param: Param) -> str:
    if param.type is bool and not param.option:
        return f"`{param.flag}` / `--no-{param.flag[2:]}`"
    return f"`{param.flag}`"


def _allowed(param: Param) -> str:
    """The allowed values: the declaration's range, or its choices (a registry's names listed whole)."""
    choices = param.allowed_choices() if callable(param.choices) else None
    return "one of: " + ", ".join(choices) if choices else param.describe()


def _first_paragraph(doc: str) -> str:
    import inspect

    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def cli_reference(commands: Mapping[str, Command]) -> str:
    """docs/reference/cli.md: every command of `commands` (COMMANDS, filled by importing ltcache.cli.app) with its
    arguments and options (flag, default, allowed values, meaning), from the declarations the command line itself
    is generated from."""
    parts = ["# Command-line reference", "",
             "Generated from the commands' declarations (`python docs/generate.py`); do not edit by hand. "
             "`ltcache COMMAND --help` prints the same. Every value is checked against its declaration before the "
             "command does anything: a bad one is a one-line error with exit code 2. "
             "[What each command does](commands.md) says more of each.", "",
             "Global options: `ltcache --debug COMMAND ...` shows full tracebacks; `ltcache --version` prints the "
             "version.", ""]
    for name, entry in commands.items():
        usage = " ".join(f"[{a.name.upper()}]" if a.optional else a.name.upper() + ("..." if a.type is list else "")
                         for a in entry.arguments)
        parts += [f"## `ltcache {name}`", "", _first_paragraph(entry.doc), "", "```",
                  f"ltcache {name} {usage} [OPTIONS]".replace("  ", " "), "```", ""]
        parts += ["| argument or option | default | allowed | meaning |", "|---|---|---|---|"]
        for param in entry.arguments:
            parts.append(f"| `{param.name.upper()}` | {'optional' if param.optional else 'required'} | "
                         f"{_cell(param.describe())} | {_cell(param.help)} |")
        for param in entry.params:
            default = "—" if param.default is None or param.default in ((), []) else f"`{_value(param.default)}`"
            parts.append(f"| {_flag(param)} | {default} | {_cell(_allowed(param))} | {_cell(param.help)} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"
