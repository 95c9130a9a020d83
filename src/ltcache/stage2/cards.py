"""Method cards: where each stage-2 method comes from and how faithfully ltcache follows it.

Every method declares a `Card` in its registration (`@method(..., card=Card(...))`): the paper it names, where the
official code lives, what ltcache follows, each deviation with its reason, the features it expects where that
matters, and the test that checks it against an independent computation of the published method. `ltcache
methods` shows the cards; the method table and `docs/reference/methods.md` are rendered from them by
ltcache.cli.reference, never typed, and a test keeps both current.

No torch: listing methods stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
