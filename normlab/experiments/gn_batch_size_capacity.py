"""Is GN's lag behind BN about the small network? BN vs GN at N=32 in a deeper and in a wider ResNet.

In the `gn_batch_size` `cpu_long` sweep (ResNet-8, width 16), GN trails BN by about ten points at N=32,
and neither the number of groups (`gn_batch_size_groups`) nor longer training (5, 20, 30 epochs)
closes the gap, whereas the paper (ResNet-50) and a CIFAR reproduction with ResNet-20 find GN within
about half a point of BN. This repeats the N=32 pair of that sweep, same protocol and seeds (3, the
book's minimum for a verdict), with ResNet-20 (three blocks per stage instead of one) and with ResNet-8
at twice the width.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gn_batch_size as base

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], "models": [[14, 8], [8, 16]], "batch_size": 8},
    "cpu": {**base.PROFILES["cpu_long"], "models": [[20, 16], [8, 32]], "batch_size": 32},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "depth": depth, "width": width, "batch_size": config["batch_size"], "seed": seed}
            for seed in config["seeds"] for depth, width in config["models"] for norm in ("bn", "gn")]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False, checkpoint=None):
    return base.run_one(run, {**config, "depth": run["depth"], "width": run["width"]}, device, progress, checkpoint)
