"""Shared test setup: repository paths, the venv's Jupyter kernel, offline-friendly data location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# The `python3` kernel must be this interpreter's, whatever kernelspecs a user has installed elsewhere:
# JUPYTER_PATH is searched before the user's and the system's data folders.
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    [str(Path(sys.prefix) / "share" / "jupyter")] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
)
# Matplotlib must never try to open a window in CI.
os.environ.setdefault("MPLBACKEND", "Agg")
# The shared data folder beside the checkout (CI's layout), when NORMLAB_DATA is not set.
if "NORMLAB_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["NORMLAB_DATA"] = str(ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
