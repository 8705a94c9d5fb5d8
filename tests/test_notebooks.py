"""Every chapter: a real papermill run with the smoke profile, and hygiene of the committed notebook.

nbval (run by `make test` over `notebooks/`) separately re-executes the committed notebooks with their
default `profile="recorded"` and compares the cells marked `# NBVAL_CHECK_OUTPUT`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import NOTEBOOKS, ROOT
from nbtools import run_smoke

pytestmark = pytest.mark.notebooks
ids = [nb.stem for nb in NOTEBOOKS]
BIB_KEYS = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "book" / "references.bib").read_text(), re.M))
# Strings that give away the machine a notebook was executed on.
LOCAL_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|/Users/|/private/var/|[A-Z]:\\\\Users|site-packages)")


def load(nb: Path) -> dict:
    return json.loads(nb.read_text())


def code_cells(nb: Path) -> list[dict]:
    return [c for c in load(nb)["cells"] if c["cell_type"] == "code"]


def text_of(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    return "".join("".join(v) if isinstance(v, list) else str(v) for k, v in data.items() if k.startswith("text/"))


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 1, "no notebooks found under notebooks/"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_smoke_run(nb: Path, tmp_path: Path):
    """The chapter executes top to bottom with profile="smoke", from another working directory."""
    run_smoke(nb, tmp_path)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_kernel_and_parameters(nb: Path):
    d = load(nb)
    assert d["metadata"].get("kernelspec", {}).get("name") == "python3", f"{nb.name}: kernelspec must be python3"
    first = code_cells(nb)[0]
    assert "parameters" in first["metadata"].get("tags", []), f"{nb.name}: first code cell must be tagged 'parameters'"
    assert re.search(r'^profile\s*=\s*"recorded"', "".join(first["source"]), re.M), \
        f'{nb.name}: the parameters cell must set profile = "recorded" (the book renders recorded results)'


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_outputs_committed_in_order(nb: Path):
    cells = code_cells(nb)
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), f"{nb.name}: some code cells were never executed"
    assert counts == list(range(1, len(cells) + 1)), \
        f"{nb.name}: execution counts {counts} are not 1..n: re-run top to bottom with `make notebooks NB={nb.relative_to(ROOT)}`"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{nb.name}: every chapter has a figure"
    for c in cells:
        if "NBVAL_CHECK_OUTPUT" in "".join(c["source"]):
            assert c.get("outputs"), f"{nb.name}: a # NBVAL_CHECK_OUTPUT cell has no committed output"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_no_stderr_errors_paths_or_reprs(nb: Path):
    for i, c in enumerate(code_cells(nb)):
        for o in c.get("outputs", []):
            where = f"{nb.name}, code cell {i}"
            assert o.get("output_type") != "error", f"{where}: committed output is an error"
            assert not (o.get("output_type") == "stream" and o.get("name") == "stderr"), \
                f"{where}: stderr in committed outputs (a warning or a progress bar): fix it or silence it"
            text = text_of(o)
            assert not LOCAL_PATH.search(text), f"{where}: output contains a machine-specific path: {LOCAL_PATH.search(text)[0]!r}"
            # A text/plain fallback beside a PNG is normal; a Figure repr without the image is a leak.
            if "image/png" not in o.get("data", {}):
                assert "<Figure size" not in text, f"{where}: a Figure repr leaked: end the cell with plt.show()"
        if "NBVAL_CHECK_OUTPUT" in "".join(c["source"]):
            checked = "".join(text_of(o) for o in c.get("outputs", []))
            assert not re.search(r"\b\d+(\.\d+)?\s*(ms|µs|us)\b|it/s|s/it", checked), \
                f"{nb.name}, code cell {i}: timings or progress in a checked cell"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_citations_exist_and_chapter_in_toc(nb: Path):
    d = load(nb)
    md = "".join("".join(c["source"]) for c in d["cells"] if c["cell_type"] == "markdown")
    keys = {k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", md) for k in group.split(",")}
    assert keys, f"{nb.name}: a chapter cites its sources with {{cite}}"
    assert keys <= BIB_KEYS, f"{nb.name}: unknown citation keys {sorted(keys - BIB_KEYS)}: add them to book/references.bib"
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {ch["file"] for part in toc["parts"] for ch in part["chapters"]}
    assert f"notebooks/{nb.stem}" in files, f"{nb.name} is not in _toc.yml"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_record_markers_are_hidden_and_only_while_a_record_records(nb: Path):
    """A `TODO(record)` marker (prose still to be read off a record) sits in an HTML comment, so readers
    never see it, and only in a chapter that renders a record still recording (its outputs say so):
    once the record is complete and the chapter re-executed, the markers must have been filled."""
    d = load(nb)
    markdown = "\n".join("".join(c["source"]) for c in d["cells"] if c["cell_type"] == "markdown")
    visible = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    assert "TODO" not in visible, f"{nb.name}: a TODO outside an HTML comment shows in the book"
    if "TODO(record)" in markdown:
        outputs = " ".join(text_of(o) for c in code_cells(nb) for o in c.get("outputs", []))
        assert "still recording" in outputs, \
            f"{nb.name}: its records are complete, but TODO(record) markers remain: fill them from the outputs"
