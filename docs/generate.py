"""Regenerate the documentation that is rendered from the code and the published results, never typed:

- docs/reference/methods.md and docs/reference/methods-table.md, from the method registry's cards (`ltcache methods
  --markdown`), and docs/reference/cli.md, from the commands' Param declarations;
- every `<!-- include: PATH -->` ... `<!-- end include -->` block of README.md, the pages under docs/ and
  experiments/README.md and RESULTS.md, from the file it names (PATH relative to the including document).

    python docs/generate.py            # rewrite what changed
    python docs/generate.py --check    # exit 1 and name what is stale (tests/test_published.py does the same)

experiments/studies.py --publish calls `refresh_documents` after copying a study's tables into the repository.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference"
GENERATED = (REFERENCE / "methods.md", REFERENCE / "methods-table.md", REFERENCE / "cli.md")
# The hand-written documents: their include blocks are refreshed, and their prose is checked (tests/test_published.py)
DOCUMENTS = ("README.md", "experiments/README.md", "experiments/RESULTS.md",
             *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md") if p not in GENERATED))
INCLUDE = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def generated_files() -> dict[Path, str]:
    """The files rendered from the method registry and the command declarations, with their content."""
    from ltcache.cli.app import COMMANDS
    from ltcache.cli.reference import cli_reference, methods_reference, methods_table
    from ltcache.stage2 import METHODS, method_names

    names, entries = method_names(), dict(METHODS.items())
    pages = (methods_reference(names, entries), methods_table(names, entries), cli_reference(COMMANDS))
    return dict(zip(GENERATED, pages, strict=True))


def includes(text: str) -> list[tuple[str, str]]:
    """(path, body) of every include block in `text`."""
    return [(match.group("path"), match.group("body")) for match in INCLUDE.finditer(text)]


def refresh_includes(text: str, base: Path, *, strict: bool = True) -> str:
    """`text` with every include block holding the current content of the file it names (relative to `base`). A
    named file that does not exist is an error, or with strict=False leaves its block as it is."""
    missing = [path for path, _ in includes(text) if not (base / path).is_file()]
    if missing and strict:
        raise SystemExit(f"error: an include block names {base / missing[0]}, which does not exist; run the command "
                         "that publishes it (experiments/studies.py ... --publish)")

    def body(match: re.Match) -> str:
        path = base / match.group("path")
        return match.group(0) if not path.is_file() else match.group(1) + path.read_text() + match.group(4)

    return INCLUDE.sub(body, text)


def refresh_documents(check: bool = False, *, strict: bool = True) -> list[str]:
    """Rewrite the generated files and the include blocks (or, with `check`, only list what is stale). strict=False
    (a study publishing its own tables) leaves the blocks of files not published yet as they are."""
    stale = []
    for path, content in generated_files().items():
        if not path.is_file() or path.read_text() != content:
            stale.append(str(path.relative_to(REPO)))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
    for name in DOCUMENTS:
        document = REPO / name
        text = document.read_text()
        updated = refresh_includes(text, document.parent, strict=strict)
        if updated != text:
            stale.append(name)
            if not check:
                document.write_text(updated)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale")
    args = parser.parse_args(argv)
    stale = refresh_documents(check=args.check)
    for name in stale:
        print(("stale: " if args.check else "rewrote: ") + name)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
