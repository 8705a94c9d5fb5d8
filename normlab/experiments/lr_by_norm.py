"""How high a learning rate does each norm allow, and how fast does each converge? Claims C01 and C02.

C01: "BatchNorm permits about 10x higher learning rates"; C02: "BN gives 10x (or 3-5x) faster
convergence". One small CNN (`normlab.models.small.NormCNN`: six 3x3 convolutions, strides 2-1-2-1-2-1,
16-64 channels) on Fashion-MNIST with BN, GroupNorm (`gn_groups` groups), LayerNorm (GroupNorm with
one group: statistics over C, H, W) and no norm. The net without a norm has He init (normlab's
default, `models.small.kaiming`), which keeps its signal's scale: the baseline is a sensible plain net,
not PyTorch's default init. Every norm is trained at every lr of a grid (`lrs`, steps of about 3x),
SGD with momentum 0.9, a constant lr (no warmup, no decay: the highest lr that trains is not softened
by a schedule, and steps-to-target is not shaped by one), the same step budget and data order
(seed) for all, no augmentation, 3 seeds.

Metrics per run: `test_error` (percent, full test set, at the end), `train_error`, `train_loss`,
`test_loss`, `steps`, `diverged`, `lr`, `steps_to_target`: the first evaluated step (every
`eval_every`, on the first `n_eval` test images) with test error <= the config's `target_error`
(None if never reached), and the record keys `data_source`, `n_train`, `n_test`. `target_error` is
chosen (from trial runs) as an error the net without a norm reaches at its best lr within the budget.

Readers: `trainable_lrs`, `largest_trainable_lr`, `lr_ratio` (C01), `best_lr`,
`steps_to_target_at_best`, `convergence_speedup` (C02), `final_error_at_best`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.small import NormCNN
from ..utils import seed_all
from . import _claims
from .. import results

NORMS = ("bn", "gn", "ln", "none")

_COMMON: dict[str, Any] = {
    "dataset": "fashion_mnist", "norms": list(NORMS), "widths": [16, 16, 32, 32, 64, 64],
    "strides": [2, 1, 2, 1, 2, 1], "gn_groups": 8, "batch_size": 128, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "constant", "warmup_steps": 0, "subset_seed": 1234,
    # a run "trains" (C01) if every seed ends below this test error without diverging
    "trainable_error": 20.0,
}

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: tiny data and net, 2 lrs, a dozen steps; proves the code path
    "smoke": {**_COMMON, "widths": [8, 8, 16], "strides": [2, 2, 2], "gn_groups": 4, "n_train": 256,
              "n_test": 128, "n_eval": 64, "batch_size": 32, "lrs": [0.01, 0.1], "seeds": [0], "steps": 12,
              "eval_every": 6, "target_error": 85.0, "trainable_error": 90.0},
    # 4 norms x 7 lrs x 3 seeds x 1000 steps of 128 images (2.1 epochs of 60k); test error every 50 steps
    # on 2000 test images (the curves, steps_to_target), at the end on all 10k. target_error: the net
    # without a norm reached 15% by step 650 of 1000 at its best lr (0.1) in a trial run (seed 0)
    "cpu": {**_COMMON, "n_train": None, "n_test": None, "n_eval": 2000,
            "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "seeds": [0, 1, 2], "steps": 1000, "eval_every": 50,
            "target_error": 15.0},
}


def check_config(config: dict[str, Any]) -> None:
    _claims.check_choice("norms", config["norms"], NORMS)
    _claims.check_lrs(config["lrs"])
    _claims.check_target(config["target_error"])
    _claims.check_target(config["trainable_error"], "trainable_error")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (seed, lr, norm); seeds outermost, so a cut-short sweep covers the whole grid once."""
    check_config(config)
    return [{"norm": norm, "lr": lr, "seed": seed}
            for seed in config["seeds"] for lr in config["lrs"] for norm in config["norms"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    check_config(config)
    _claims.check_choice("norm", [run["norm"]], NORMS)
    data = _claims.load_data(config)
    seed_all(run["seed"])  # initialization
    model = NormCNN(run["norm"], config["widths"], config["strides"], in_channels=data[0].shape[1],
                    groups=config["gn_groups"])
    _, _, result = _claims.fit(model, run, config, data, checkpoint=checkpoint, device=device, progress=progress,
                               desc=f"{run['norm']} lr={run['lr']} seed={run['seed']}")
    return result


# ----------------------------------------------------------------------------------------------------
# readers: what the claims ledger quotes (record = normlab.results.load("lr_by_norm"))
# ----------------------------------------------------------------------------------------------------


def trainable_lrs(record: dict[str, Any], norm: str, max_error: float | None = None) -> list[float]:
    """The grid's lrs at which every seed of `norm` ends below `max_error` percent test error without
    diverging (default: the config's `trainable_error`), ascending."""
    max_error = record["config"]["trainable_error"] if max_error is None else max_error
    return [lr for lr in _claims.grid(record, "lr", norm=norm)
            if _claims.trains(record, max_error, norm=norm, lr=lr)]


def largest_trainable_lr(record: dict[str, Any], norm: str, max_error: float | None = None) -> float | None:
    """The largest lr of `trainable_lrs` (None if none trains). Resolution: the grid's step (~3x)."""
    lrs = trainable_lrs(record, norm, max_error)
    return max(lrs) if lrs else None


def lr_ratio(record: dict[str, Any], norm: str = "bn", baseline: str = "none",
             max_error: float | None = None) -> float | None:
    """C01: largest trainable lr of `norm` over that of `baseline` (None if either trains at no lr).

    A ratio of two grid points, so it moves in steps of the grid (~3x); a grid edge can hide a larger
    ratio: check `largest_trainable_lr(record, norm) < max(record["config"]["lrs"])`.
    """
    a, b = largest_trainable_lr(record, norm, max_error), largest_trainable_lr(record, baseline, max_error)
    return None if a is None or b is None else a / b


def best_lr(record: dict[str, Any], norm: str, criterion: str = "test_error") -> float:
    """The lr with the lowest median final test error over seeds (`criterion="steps_to_target"`: the
    fewest median steps to the config's target), among lrs at which no seed diverged."""
    return _claims.best_lr(record, criterion, record["config"]["target_error"], norm=norm)


def steps_to_target_at_best(record: dict[str, Any], norm: str, target_error: float | None = None,
                            criterion: str = "test_error") -> dict[int, int | None]:
    """`{seed: steps}` to `target_error` (default the config's; recomputed from the histories) at `best_lr`;
    None for a seed that never reached it within the budget."""
    target = record["config"]["target_error"] if target_error is None else target_error
    lr = best_lr(record, norm, criterion)
    return {r["seed"]: _claims.steps_to_target(r["history"], target)
            for r in results.runs_where(record, norm=norm, lr=lr)}


def convergence_speedup(record: dict[str, Any], norm: str = "bn", baseline: str = "none",
                        target_error: float | None = None, criterion: str = "test_error"):
    """C02: steps to the target of `baseline` over those of `norm`, each at its own `best_lr`, as a
    `normlab.stats.Interval` (geometric mean over seeds, t interval on the logs, paired by seed).

    > 1 means `norm` converges faster. ValueError naming the seeds if a seed never reached the target.
    """
    return _claims.ratio_across_seeds(steps_to_target_at_best(record, baseline, target_error, criterion),
                                      steps_to_target_at_best(record, norm, target_error, criterion))


def final_error_at_best(record: dict[str, Any], norm: str) -> dict[int, float]:
    """`{seed: final test error}` of `norm` at its `best_lr`."""
    return results.by_seed(record, "test_error", norm=norm, lr=best_lr(record, norm))
