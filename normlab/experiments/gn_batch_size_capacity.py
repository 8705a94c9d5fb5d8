"""Is GN's lag behind BN about the small network? BN vs GN at N=32 in a deeper and in a wider ResNet.

In the `gn_batch_size` `cpu_long` sweep (ResNet-8, width 16), GN trails BN by about ten points at N=32,
and neither the number of groups (`gn_batch_size_groups`) nor longer training (5, 20, 30 epochs)
closes the gap, whereas the paper (ResNet-50 on ImageNet) finds GN within half a point of BN at N=32
(Wu & He 2018, Table 2: 24.1% vs 23.6%). This repeats the N=32 pair of that sweep, same protocol and seeds (3, the
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


# ----------------------------------------------------------------------------------------------------
# reading the record (used by chapter 07)
# ----------------------------------------------------------------------------------------------------


def _errors(record: dict[str, Any], norm: str, n: int, depth: int, width: int, metric: str) -> dict[int, float]:
    """`{seed: metric}` of the runs of (norm, N, model); a run without depth/width is the record's own model."""
    cfg = record["config"]
    return {r["seed"]: r["metrics"][metric] for r in record["runs"]
            if r["config"]["norm"] == norm and r["config"]["batch_size"] == n
            and (r["config"].get("depth", cfg["depth"]), r["config"].get("width", cfg["width"])) == (depth, width)}


def gaps(record: dict[str, Any], base_record: dict[str, Any], metric: str = "test_error") -> list[dict[str, Any]]:
    """GN minus BN in `metric` at the record's N, per model, paired by seed over the record's seeds: first
    the base sweep's own model (`base_record`, e.g. `cpu_long`: the same runs at that model), then each of
    the record's `models`. Each row: `depth`, `width`, `bn` and `gn` (`{seed: value}`), `per_seed`
    (GN - BN), `interval` (`gn_batch_size._paired`: a t interval, None with fewer than 2 seeds)."""
    cfg, n = record["config"], record["config"]["batch_size"]
    seeds = set(cfg["seeds"])
    models = [(base_record["config"]["depth"], base_record["config"]["width"], base_record)]
    models += [(d, w, record) for d, w in cfg["models"]]
    out = []
    for depth, width, src in models:
        bn, gn = ({s: v for s, v in _errors(src, norm, n, depth, width, metric).items() if s in seeds}
                  for norm in ("bn", "gn"))
        common = sorted(set(bn) & set(gn))
        out.append({"depth": depth, "width": width, "bn": bn, "gn": gn,
                    "per_seed": {s: gn[s] - bn[s] for s in common}, "interval": base._paired(gn, bn)})
    return out


def verdicts(record: dict[str, Any], base_record: dict[str, Any],
             margin: float = base.EQUIVALENCE_MARGIN) -> list[tuple[str, Any, str]]:
    """`(claim, Interval, verdict)` rows for `normlab.stats.verdict_table`: for each model, "GN matches BN
    at N" (GN - BN within +-`margin` points, the headline's equivalence rule); and for each of the
    record's models, whether it narrows the base model's gap ((GN - BN) of the model minus (GN - BN) of
    the base model, paired by seed, < 0). Below `stats.MIN_SEEDS` seeds: "not tested here"."""
    from ..stats import seed_verdict

    n = record["config"]["batch_size"]
    rows_ = gaps(record, base_record)
    name = lambda g: f"ResNet-{g['depth']} width {g['width']}"  # noqa: E731
    out = [(f"GN matches BN at N={n} within +-{margin:g} ({name(g)})", g["interval"],
            seed_verdict(g["interval"], direction="equivalent", margin=margin)) for g in rows_]
    ref = rows_[0]
    for g in rows_[1:]:
        iv = base._paired(g["per_seed"], ref["per_seed"])
        out.append((f"{name(g)} narrows GN's gap vs {name(ref)}", iv, seed_verdict(iv, direction="less")))
    return out
