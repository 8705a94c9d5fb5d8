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


# ----------------------------------------------------------------------------------------------------
# reading the record (used by chapter 07)
# ----------------------------------------------------------------------------------------------------


def channels_per_group(config: dict[str, Any], groups: int) -> list[int]:
    """Channels in a group in each of the CIFAR ResNet's three stages (widths w, 2w, 4w) at G=`groups`."""
    return [m * config["width"] // groups for m in (1, 2, 4)]


def table(record: dict[str, Any], base_record: dict[str, Any], metric: str = "test_error") -> list[dict[str, Any]]:
    """Per G of the record: `G`, `per_group` (`channels_per_group`), `values` (`{seed: metric}`), `mean`,
    `train_error` (mean), and `minus_bn`: GN(G) minus BN at the record's N from `base_record` (the
    `cpu_long` sweep, same protocol and seeds), paired by seed (`gn_batch_size._paired`; None with fewer
    than 2 seeds)."""
    cfg, n = record["config"], record["config"]["batch_size"]
    bn = {r["seed"]: r["metrics"][metric] for r in base_record["runs"]
          if r["config"]["norm"] == "bn" and r["config"]["batch_size"] == n and r["seed"] in cfg["seeds"]}
    out = []
    for g in cfg["group_list"]:
        rs = [r for r in record["runs"] if r["config"]["gn_groups"] == g]
        if not rs:
            continue
        values = {r["seed"]: r["metrics"][metric] for r in rs}
        out.append({"G": g, "per_group": channels_per_group(cfg, g), "values": values,
                    "mean": sum(values.values()) / len(values),
                    "train_error": sum(r["metrics"]["train_error"] for r in rs) / len(rs),
                    "minus_bn": base._paired(values, bn)})
    return out


def verdicts(record: dict[str, Any], base_record: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """`(claim, Interval, verdict)` rows for `normlab.stats.verdict_table`: for each G, "GN trails BN at N"
    (GN(G) - BN > 0, paired by seed), and "G=C (InstanceNorm in the first stage) is worse than the
    base sweep's G" (GN(G_max) - GN(G_base) > 0, as the paper found on ImageNet). Below
    `stats.MIN_SEEDS` seeds: "not tested here"."""
    from ..stats import seed_verdict

    n, g_base = record["config"]["batch_size"], base_record["config"]["gn_groups"]
    rows_ = table(record, base_record)
    out = [(f"GN (G={r['G']}) trails BN at N={n}", r["minus_bn"], seed_verdict(r["minus_bn"], direction="greater"))
           for r in rows_]
    by_g = {r["G"]: r["values"] for r in rows_}
    g_max = max(by_g)
    if g_base in by_g and g_max != g_base:
        iv = base._paired(by_g[g_max], by_g[g_base])
        out.append((f"G={g_max} is worse than G={g_base}", iv, seed_verdict(iv, direction="greater")))
    return out
