"""Screenshots of report pages for the docs (docs/images/), taken in headless Chromium at 1280 px wide.

    python docs/screenshots.py PAGE.html OUT.png [--section ID] [--height PIXELS]

`--section` starts the picture at the element with that id (e.g. grids, per-class, fig-per_class); `--height` is
how much of the page it keeps. The picture is reduced to a 256-colour palette, which keeps a page's text sharp at a
fraction of the size. Needs Debian's chromium and Pillow; the Chrome DevTools client is the tests' (tests/cdp.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def screenshot(page: Path, out: Path, *, section: str | None = None, height: int = 1800, width: int = 1280) -> dict:
    """Render `page`, keep `height` pixels from the top (or from element `section`), write `out`; the layout seen."""
    from cdp import Browser, find_chromium
    from PIL import Image

    executable = find_chromium()
    if executable is None:
        raise SystemExit("error: chromium is not installed (Debian package chromium)")
    browser = Browser(executable, width=width, height=1000)
    try:
        session = browser.open(Path(page).resolve().as_uri())
        top = 0
        if section:
            top = browser.evaluate(session, f"(() => {{ const e = document.getElementById({section!r}); "
                                            "return e ? Math.round(e.getBoundingClientRect().top + scrollY) : -1; })()")
            if top < 0:
                raise SystemExit(f"error: {page} has no element with id {section!r}")
        layout = browser.evaluate(session, "({scroll: document.documentElement.scrollWidth, "
                                           "client: document.documentElement.clientWidth})")
        with tempfile.TemporaryDirectory() as folder:
            browser.screenshot(session, Path(folder) / "page.png")
            data = (Path(folder) / "page.png").read_bytes()
    finally:
        browser.close()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.crop((0, top, image.width, min(image.height, top + height)))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(out, optimize=True)
    return layout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--section", default=None)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args(argv)
    layout = screenshot(args.page, args.out, section=args.section, height=args.height)
    print(f"{args.out}: page {layout['scroll']} px wide in a {layout['client']} px window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
