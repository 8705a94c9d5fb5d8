"""Shared test setup: repository paths, the venv's Jupyter kernel, offline-friendly data location."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def build_book(book: Path, *options: str) -> subprocess.CompletedProcess:
    """`jupyter-book build` of `book` as `make test` runs it: warnings and broken references fail it."""
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", str(book), "--warningiserror", "--nitpick", "--keep-going", *options],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary for the browser checks. Missing: a skip on a developer's machine, a failure in CI."""
    from browser import INSTALL_HINT, find_chromium

    path = find_chromium()
    if path is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Chromium not found: {INSTALL_HINT}")
    return path


# torch's fused normalization kernels: normlab's layers must not call them (tests run them under `no_fused`).
FUSED = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "native_batch_norm",
         "native_layer_norm", "native_group_norm", "_weight_norm", "norm_except_dim"]


@contextlib.contextmanager
def _forbid_fused():
    """Replace torch's fused normalization entry points (those that exist) by functions that raise."""
    saved = []

    def make(name):
        def forbidden(*args, **kwargs):
            raise AssertionError(f"normlab called torch's fused kernel {name}")
        return forbidden

    for owner in (F, torch):
        for name in FUSED:
            if hasattr(owner, name):
                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, make(f"{owner.__name__}.{name}"))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


@pytest.fixture
def no_fused():
    """Use as `with no_fused(): ...` around every normlab forward/backward."""
    return _forbid_fused
