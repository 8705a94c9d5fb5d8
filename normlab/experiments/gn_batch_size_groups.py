"""How many groups? GN at N=32 with G in {1, 2, 4, 8, 16}, the `gn_batch_size` `cpu_long` protocol.

In `gn_batch_size`, GN trails BN by several points at N=32, where the paper finds half a point. One
suspect is the number of groups: a CIFAR ResNet's first stage has only 16 channels, so the G=8 we use
(the paper's G=32 cannot divide 16) puts 2 channels in a group there, close to InstanceNorm, which
Wu & He {cite}`wu2018group` (Table 1) found 4.3 points worse than GN on ImageNet (28.4% vs 24.1%).
G=1 is LayerNorm over (C, H, W); G=16 is InstanceNorm in the first stage.
Same data subset, model, learning rate, epochs and seeds as the `cpu_long` sweep, so G=8 here repeats
its GN runs at N=32 (and, seeded on a CPU, must reproduce them exactly).
"""

from __future__ import annotations

from typing import Any

import torch

from . import gn_batch_size as base

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], "group_list": [1, 8], "batch_size": 8},
    "cpu": {**base.PROFILES["cpu_long"], "group_list": [1, 2, 4, 8, 16], "batch_size": 32},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": "gn", "gn_groups": g, "batch_size": config["batch_size"], "seed": seed}
            for seed in config["seeds"] for g in config["group_list"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False, checkpoint=None):
    return base.run_one(run, {**config, "gn_groups": run["gn_groups"]}, device, progress, checkpoint)
