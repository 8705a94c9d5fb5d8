"""Does bf16 training move the verdict? BN and GN at N=32 in fp32 and in the fastest precision, paired by seed.

The trainer can train in bf16 autocast (and BN nets channels_last), about 1.6-1.9x faster on a CPU
with AVX-512 BF16 (`normlab.train.FASTEST`). A faster default is only acceptable if it does not
change what the book measures: this experiment trains the `gn_batch_size` `cpu` protocol (ResNet-8,
16 px, 10k images, k=4 workers, 5 epochs) at N=32 with BN and GN, once in fp32 NCHW (the reference)
and once with `precision="auto"`, for 3 seeds. Same seed, same initialization and batches: the paired
difference of test error, bf16 minus fp32, is compared with the spread over seeds.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gn_batch_size as base

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], "batch_size": 8, "precisions": ["fp32", "auto"], "seeds": [0, 1]},
    "cpu": {**base.PROFILES["cpu"], "batch_size": 32, "precisions": ["fp32", "auto"]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "precision": p, "batch_size": config["batch_size"], "seed": seed}
            for seed in config["seeds"] for norm in config["norms"] for p in config["precisions"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False,
            checkpoint=None):
    memory_format = "auto" if run["precision"] == "auto" else "contiguous"
    return base.run_one(run, {**config, "precision": run["precision"], "memory_format": memory_format}, device,
                        progress, checkpoint)


def paired_effect(record: dict[str, Any], norm: str, metric: str = "test_error"):
    """bf16 ("auto") minus fp32 test error for `norm`, paired by seed, as a `normlab.stats.Interval`."""
    from ..stats import paired_difference

    by = {p: {r["seed"]: r["metrics"][metric] for r in record["runs"]
              if r["config"]["norm"] == norm and r["config"]["precision"] == p} for p in ("auto", "fp32")}
    return paired_difference(by["auto"], by["fp32"])
