"""The CI can fail: a notebook that raises, a broken citation, a missing strict flag are all caught."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import nbformat
import papermill
import pytest

from conftest import ROOT, build_book
from nbtools import run_smoke


def make_notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "recorded"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def test_a_raising_notebook_fails_the_smoke_run(tmp_path):
    nb = make_notebook(tmp_path / "bad.ipynb", 'if profile == "smoke":\n    raise RuntimeError("deliberate failure")')
    with pytest.raises(papermill.PapermillExecutionError, match="deliberate failure"):
        run_smoke(nb, tmp_path)


def test_a_slow_cell_fails_the_smoke_run(tmp_path, monkeypatch):
    import nbtools

    monkeypatch.setattr(nbtools, "CELL_TIMEOUT_S", 2)
    nb = make_notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(30)")
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        nbtools.run_smoke(nb, tmp_path)


def tiny_book(tmp_path: Path, pages: dict[str, str]) -> Path:
    """A book with this repository's configuration and the given pages (name -> MyST text), first is root."""
    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "book", book / "book", ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    root, *chapters = pages
    (book / "_toc.yml").write_text(f"format: jb-book\nroot: {root}\n"
                                   + ("chapters:\n" + "".join(f"  - file: {c}\n" for c in chapters) if chapters else ""))
    for name, text in pages.items():
        (book / f"{name}.md").write_text(text)
    return book


@pytest.mark.slow
def test_a_broken_citation_fails_the_strict_build(tmp_path):
    """The same tiny book builds with a known key and fails with an unknown one."""
    book = tiny_book(tmp_path, {"intro": "# Intro\n\nBatchNorm {cite}`ioffe2015batch`.\n",
                                "refs": "# References\n\n```{bibliography}\n```\n"})
    ok = build_book(book)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]

    (book / "intro.md").write_text("# Intro\n\nBatchNorm {cite}`nosuchpaper2099`.\n")
    shutil.rmtree(book / "_build")
    bad = build_book(book)
    assert bad.returncode != 0
    assert "nosuchpaper2099" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_the_browser_check_fails_broken_math_images_requests_scripts_and_clipping(tmp_path, chromium):
    """One good page passes; an unknown macro, TeX left untypeset, an undecodable image, a request to the
    network, a script error, an output that does not wrap and clipped code each fail their page, with a
    message that says what."""
    from browser import check_book, toc_pages

    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/eL9GtQAAAABJRU5ErkJggg==")
    book = tiny_book(tmp_path, {
        "good": "# Good\n\nInline $x_{nchw}$ and display\n\n$$\\mu_c = \\frac{1}{m}\\sum_i x_i$$\n\n![a dot](dot.png)\n",
        "macro": "# Macro\n\nA typo: $\\undefinedmacro{x} + 1$.\n",
        # MathJax loads but is told not to typeset: the TeX stays on the page as text.
        "raw": "# Raw\n\n<script>window.MathJax = {startup: {typeset: false}}</script>\n\nSo $a + b$ stays raw.\n",
        "image": "# Image\n\n![a broken figure](broken.png)\n",
        "remote": '# Remote\n\n<img alt="remote" src="https://example.invalid/figure.png">\n',
        "script": '# Script\n\n<script>throw new Error("deliberate failure")</script>\n',
        # Styles that defeat the book's CSS: an output that does not wrap, code clipped instead of scrolled.
        "wide": '# Wide\n\n<div class="cell_output"><pre style="white-space: pre">' + "wide " * 100 + "</pre></div>\n",
        "clipped": '# Clipped\n\n<div class="highlight"><pre style="overflow: hidden">' + "code " * 100 + "</pre></div>\n",
    })
    (book / "dot.png").write_bytes(png)
    (book / "broken.png").write_bytes(png[:40])  # a truncated PNG: the build copies it, no browser decodes it
    built = build_book(book)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]

    reports = {r.page.removesuffix(".html"): r for r in
               check_book(book / "_build" / "html", toc_pages(book), shots=tmp_path / "shots", executable=chromium)}
    assert reports["good"].problems == [], str(reports["good"])
    assert reports["good"].typeset == reports["good"].math == 2
    assert reports["good"].images == 1 and reports["good"].screenshots
    expected = {"macro": r"does not typeset: undefined macro \undefinedmacro",
                "raw": "raw TeX in the visible text", "image": "image did not load: _images/broken.png",
                "remote": "request to the network: https://example.invalid/figure.png",
                "script": "JavaScript error: Error: deliberate failure", "wide": "does not wrap", "clipped": "is cut off"}
    for page, message in expected.items():
        assert any(message in p for p in reports[page].problems), f"{page} should fail with {message!r}:\n{reports[page]}"


def test_make_test_is_strict_and_ci_calls_it():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "--warningiserror" in recipe and "--nitpick" in recipe and "--nbval-lax" in recipe
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert re.search(r"command -v chromium", ci) and re.search(r"apt-get install -y .*chromium", ci), \
        ".ci/run must install Chromium for the browser test when it is missing"
    assert recipe.index("build . --all") < recipe.index("pytest"), "the browser test needs the book built first"
    config = (ROOT / "_config.yml").read_text()
    assert re.search(r'execute_notebooks:\s*"?off"?', config)
    assert "only_build_toc_files: true" in config
