"""The CI can fail: a notebook that raises, a broken citation, a missing strict flag are all caught."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from conftest import ROOT
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


def build_book(book: Path) -> subprocess.CompletedProcess:
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", str(book), "--warningiserror", "--nitpick", "--keep-going"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_broken_citation_fails_the_strict_build(tmp_path):
    """The same tiny book builds with a known key and fails with an unknown one."""
    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    (book / "book").mkdir()
    shutil.copy(ROOT / "book" / "references.bib", book / "book" / "references.bib")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: refs\n")
    (book / "refs.md").write_text("# References\n\n```{bibliography}\n```\n")
    (book / "intro.md").write_text("# Intro\n\nBatchNorm {cite}`ioffe2015batch`.\n")
    ok = build_book(book)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]

    (book / "intro.md").write_text("# Intro\n\nBatchNorm {cite}`nosuchpaper2099`.\n")
    shutil.rmtree(book / "_build")
    bad = build_book(book)
    assert bad.returncode != 0
    assert "nosuchpaper2099" in bad.stdout + bad.stderr


def test_make_test_is_strict_and_ci_calls_it():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "--warningiserror" in recipe and "--nitpick" in recipe and "--nbval-lax" in recipe
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    config = (ROOT / "_config.yml").read_text()
    assert re.search(r'execute_notebooks:\s*"?off"?', config)
    assert "only_build_toc_files: true" in config
