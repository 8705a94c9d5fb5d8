"""Small helpers shared by the experiments: seeding, devices, the repository root."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def seed_all(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a fresh CPU generator seeded the same.

    Experiments draw their data order and augmentation from the returned generator, so two runs with
    the same seed see the same batches whatever else has used the global RNG in between.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else `$NORMLAB_DEVICE`, else CUDA when available, else CPU."""
    if device is None:
        device = os.environ.get("NORMLAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def repo_root() -> Path:
    """The checkout holding `normlab/` (with `pip install -e .`, the repository itself)."""
    return Path(__file__).resolve().parent.parent
