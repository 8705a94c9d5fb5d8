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
