"""How the tests execute notebooks: papermill with the smoke profile, outside the book's folders."""

from __future__ import annotations

from pathlib import Path

import papermill

#: Per-cell limit for smoke runs; a cell over it fails the test (papermill raises).
CELL_TIMEOUT_S = 240


def run_smoke(notebook: Path, workdir: Path, profile: str = "smoke") -> Path:
    """Execute `notebook` with `profile` injected, from `workdir` (so no chapter relies on its folder).

    Raises `papermill.PapermillExecutionError` when a cell raises, and a timeout error past
    `CELL_TIMEOUT_S` seconds in one cell.
    """
    out = workdir / f"{notebook.stem}.smoke.ipynb"
    papermill.execute_notebook(
        str(notebook), str(out), parameters={"profile": profile}, kernel_name="python3",
        cwd=str(workdir), execution_timeout=CELL_TIMEOUT_S, progress_bar=False, log_output=False,
    )
    return out


def tidy(path: str | Path) -> None:
    """A freshly executed notebook as the book commits it: no execution timestamps, and consecutive
    prints of a cell in one stream output (the kernel splits them by timing, which would churn diffs)."""
    import nbformat

    nb = nbformat.read(str(path), 4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        outputs = []
        for out in cell.get("outputs", []):
            prev = outputs[-1] if outputs else None
            if prev is not None and out.output_type == prev.output_type == "stream" and out.name == prev.name:
                prev.text += out.text
            else:
                outputs.append(out)
        if "outputs" in cell:
            cell.outputs = outputs
    nbformat.write(nb, str(path))
