"""The built book as a reader sees it: every page of _toc.yml in headless Chromium, offline.

`make test` builds the book strictly first; run by hand, this builds it when a source is newer than the
build. The checks themselves are in tests/browser.py; test_ci_catches.py shows that they fail a page
with broken math, images, requests, scripts or clipped code. Screenshots: _build/screenshots/index.html.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from browser import check_book, toc_pages
from conftest import ROOT, build_book

pytestmark = pytest.mark.browser
BUILD = ROOT / "_build"
SOURCES = [ROOT / "_config.yml", ROOT / "_toc.yml", ROOT / "book", ROOT / "notebooks"]


def newest_source() -> float:
    files = [p for s in SOURCES for p in ([s] if s.is_file() else s.rglob("*"))
             if p.is_file() and not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)]
    return max(p.stat().st_mtime for p in files)


@pytest.fixture(scope="module")
def built_html() -> Path:
    html = BUILD / "html"
    stamp = html / ".buildinfo"  # rewritten by every build
    if not stamp.is_file() or stamp.stat().st_mtime < newest_source():
        built = build_book(ROOT, "--all")
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return html


def test_mathjax_is_served_from_the_book(built_html):
    """Every page that loads MathJax loads the copy in the book's _static, never a CDN's."""
    srcs = {page: re.findall(r'<script[^>]*\ssrc="([^"]*mathjax[^"]*)"', (built_html / page).read_text(), re.I)
            for page in toc_pages(ROOT)}
    assert any(srcs.values()), "no page loads MathJax: is sphinx-mathjax-offline in _config.yml's extra_extensions?"
    remote = {page: s for page, s in srcs.items() if any("://" in src or "_static/mathjax/" not in src for src in s)}
    assert not remote, f"MathJax loaded from outside the book's _static: {remote}"
    assert (built_html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_every_page_reads_right_offline(chromium, built_html):
    pages = toc_pages(ROOT)
    shots = BUILD / "screenshots"
    reports = check_book(built_html, pages, shots=shots, executable=chromium)
    print("\n".join(map(str, reports)))
    assert [r.page for r in reports] == pages
    assert sum(r.math for r in reports) > 0, "the chapters have formulas; the check found none"
    failed = [r for r in reports if r.problems]
    assert not failed, (f"{len(failed)} of {len(reports)} pages do not read right offline "
                        f"(screenshots: {shots / 'index.html'}):\n" + "\n".join(map(str, failed)))
