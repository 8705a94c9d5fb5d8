"""GN vs BN at N=32 and N=2 with 4x longer training: is the short-run protocol hiding or adding an effect?

A companion of `gn_batch_size` (same data subset, model, per-worker BN, learning-rate rule and seeds):
only the number of epochs changes. In a short run, N also changes how far the optimizer gets (N=2
takes 16x more steps than N=32 at the same number of epochs); training longer shows which of the
differences in `gn_batch_size` are about normalization and which are about being far from convergence.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gn_batch_size as base

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], "epoch_list": [2], "batch_sizes": [8, 2]},
    "cpu": {**base.PROFILES["cpu"], "epoch_list": [20], "batch_sizes": [32, 2], "seeds": [0, 1, 2]},
    "full": {**base.PROFILES["full"], "epoch_list": [90], "batch_sizes": [32, 2]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "batch_size": n, "epochs": e, "seed": seed}
            for seed in config["seeds"] for e in config["epoch_list"]
            for n in config["batch_sizes"] for norm in config["norms"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False, checkpoint=None):
    return base.run_one(run, {**config, "epochs": run["epochs"]}, device, progress, checkpoint)
