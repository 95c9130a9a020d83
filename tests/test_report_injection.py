"""Markup in every field of a results.json, in class names and in folder names cannot add an element to the report
page or make it request anything. Checked in headless Chromium: the page with the payload has exactly the elements
of the same page with plain text in those fields, its title is the payload as text, and it requests nothing but
itself and its data: images (CSP `default-src 'none'` does not stop a <meta refresh> navigation: escaping does).

Number fields: markup there is refused by the reader (tests/test_hostile_surfaces.py); the page is also rendered
here from numbers replaced by markup, bypassing the reader, to show the template escapes whatever the type.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import run_ltcache, write_toy_cache
from ltcache.lab import compare
from ltcache.report import Result, render_page

# No '/' (it must be a folder name too); every way in: an element, an image request, a navigation, a script, quotes
# that would close an attribute, an entity, and mathtext for matplotlib.
PAYLOAD = ("<x-injected id=pwn></x-injected><img src=https:127.0.0.1:9><meta http-equiv=refresh "
           "content=0;url=https:127.0.0.1:9><script>document.title='pwned'<\\script>\"'&amp;$\\alpha$")
STRUCTURAL = {("curves", "*", "param")}  # a curve's param names the key of its entries: not free text


def inject(value, text: str, path: tuple = ()):
    """Every string in `value` (and every free-text key: methods, curves) replaced by `text` + a counter."""
    counter = inject.counter = getattr(inject, "counter", 0) + 1
    if isinstance(value, str):
        if any(len(path) == len(p) and all(a in (b, "*") for a, b in zip(p, path, strict=True))
               for p in STRUCTURAL):
            return value
        return f"{text}{counter}"
    if isinstance(value, list):
        return [inject(item, text, (*path, "[]")) for item in value]
    if isinstance(value, dict):
        free_keys = path in (("weight_norms",), ("curves",))
        return {(f"{text}{key}" if free_keys else key): inject(item, text, (*path, key if not free_keys else "*"))
                for key, item in value.items()}
    return value


def _compared(tmp_path: Path) -> dict:
    cache = write_toy_cache(tmp_path / "toy")
    compare(cache, methods=["joint", "ncm", "tau_norm"], bootstrap=20)
    results = json.loads((cache / "reports" / "results.json").read_text())
    results["provenance"]["class_names"] = ["cat", "dog", "bird"]
    return results


def _workspace(root: Path, results: dict, text: str) -> Path:
    """A folder named by `text` holding reports/results.json with every string field replaced by `text`."""
    folder = root / f"in{text}put"
    (folder / "reports").mkdir(parents=True)
    (folder / "reports" / "results.json").write_text(json.dumps(inject(results, text)))
    return folder


def _browse(pages: dict[str, Path]) -> dict[str, dict]:
    from cdp import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        if os.environ.get("LTCACHE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed but LTCACHE_REQUIRE_CHROMIUM is set")
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    seen = {}
    for name, page in pages.items():
        browser = Browser(executable)
        try:
            session = browser.open(page.resolve().as_uri())
            time.sleep(1.0)  # a <meta refresh> of 0 s would have fired by now
            tags = browser.evaluate(session, "(() => { const n = {}; for (const e of document.querySelectorAll('*')) "
                                             "n[e.tagName] = (n[e.tagName] || 0) + 1; return n; })()")
            seen[name] = {"tags": tags, "title": browser.evaluate(session, "document.title"),
                          "injected": browser.evaluate(session, "document.querySelectorAll('x-injected').length"),
                          "location": browser.evaluate(session, "location.href"),
                          "requests": browser.requested_urls()}
        finally:
            browser.close()
    return seen


def test_markup_in_every_string_field_class_name_and_folder_name_stays_text(tmp_path):
    results = _compared(tmp_path)
    pages = {}
    for name, text in (("plain", "plain"), ("payload", PAYLOAD)):
        folder = _workspace(tmp_path / name, results, text)
        done = run_ltcache(["report", folder, "--out", tmp_path / name / "page", "--title", text], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        pages[name] = tmp_path / name / "page" / "index.html"
    html = pages["payload"].read_text(encoding="utf-8")
    assert "<x-injected" not in html and "<script" not in html.lower() and "<meta http-equiv=refresh" not in html
    assert html.count("&lt;x-injected") >= 20  # the payload is on the page, as text, in many places
    seen = _browse(pages)
    assert seen["payload"]["tags"] == seen["plain"]["tags"], "the payload added or removed elements"
    assert seen["payload"]["injected"] == 0
    assert seen["payload"]["title"] == PAYLOAD  # escaped, the title reads back exactly as given
    for name, page in pages.items():
        assert seen[name]["location"] == page.resolve().as_uri(), "the page navigated away"
        requested = seen[name]["requests"]
        assert requested[0] == page.resolve().as_uri()
        assert all(url.startswith("data:") for url in requested[1:]), requested


def test_markup_in_number_fields_is_escaped_by_the_template_too(tmp_path):
    """Bypassing the reader's validation: numbers replaced by markup still render as text (autoescape, whatever the
    type), so the reader is a second guard, not the only one."""
    results = _compared(tmp_path)
    hostile = json.loads(json.dumps(results))
    hostile["thresholds"] = {"many": PAYLOAD, "few": PAYLOAD}
    for row in hostile["rows"]:
        row.update(n_many=PAYLOAD, n_medium=PAYLOAD, n_few=PAYLOAD)
    pages = {}
    for name, data in (("plain", results), ("payload", hostile)):
        page = tmp_path / f"{name}.html"
        page.write_text(render_page([Result(tmp_path / name, data, label=name)], title=name), encoding="utf-8")
        pages[name] = page
    assert "&lt;x-injected" in pages["payload"].read_text(encoding="utf-8")
    seen = _browse(pages)
    assert seen["payload"]["tags"] == seen["plain"]["tags"] and seen["payload"]["injected"] == 0
    assert all(url.startswith("data:") for url in seen["payload"]["requests"][1:])
