"""Method cards: where each stage-2 method comes from and how faithfully ltcache follows it.

Every method declares a `Card` in its registration (`@method(..., card=Card(...))`): the paper it names, where the
official code lives, what ltcache follows, each deviation with its reason, the features it expects where that
matters, and the test that checks it against an independent computation of the published method. `ltcache
methods` shows the cards; the README's method table and `docs/methods.md` are rendered from them here
(`methods_table`, `methods_reference`), never typed, and tests/test_published.py keeps both current.

No torch: listing methods stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ltcache.stage2.core import Method


KANG_2020 = "Kang, Xie, Rohrbach, Yan, Gordo, Feng & Kalantidis, ICLR 2020"
DECOUPLING = "Decoupling Representation and Classifier for Long-Tailed Recognition"
CLASSIFIER_BALANCING = "facebookresearch/classifier-balancing"  # the official code of Kang et al.


@dataclass(frozen=True)
class Deviation:
    """One way ltcache departs from the official code, and why."""

    what: str
    why: str


@dataclass(frozen=True)
class Card:
    """A method's provenance.

    - `paper`: authors, venue and year, e.g. "Kang et al., ICLR 2020"; `title` the paper's title.
    - `code`: the official code, "owner/repository: file, file" (None when the authors published none).
    - `matches`: what ltcache does as the official code does.
    - `deviations`: each difference with its reason.
    - `features`: what features the method expects, where it matters (e.g. CLIP's projected embedding).
    - `reference_test`: "tests/FILE.py::test_name", the test that compares ltcache's head with an independent
      computation of the published method on a small input; None lists the method as untested against one.
    """

    paper: str
    title: str = ""
    code: str | None = None
    matches: tuple[str, ...] = ()
    deviations: tuple[Deviation, ...] = ()
    features: str | None = None
    reference_test: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _defaults(entry: Method) -> str:
    if not entry.params:
        return "—"
    return ", ".join(f"`{param.name}={_value(param.default)}`" for param in entry.params)


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
    """The README's method table: name, definition, source (paper and official code) and defaults."""
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
    """docs/methods.md: every method's card and hyperparameters."""
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
            parts += [f"| `{p.name}` | `{_value(p.default)}` | {_cell(p.describe())} | {_cell(p.help)} |"
                      for p in entry.params]
            parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"
