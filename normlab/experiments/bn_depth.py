"""How much does depth cost a net without normalization, and do skip connections fix it too? C03, C06.

C03: "without normalization a 10-layer net trains in 24 h vs 4 h with BN; 50 layers do not converge;
152 are impossible"; C06: "BN prevents vanishing/exploding gradients; normalization, not skip
connections, is the real fix for deep nets". MLPs (`normlab.models.small.DeepMLP`, width 128, He
init) on Fashion-MNIST at several depths, in four architectures (`archs`):

- `plain_none`: Linear -> ReLU, no skip connections, no norm (the net of the claim);
- `plain_bn`: Linear -> BN -> ReLU;
- `res_none`: residual blocks $h \\leftarrow \\mathrm{ReLU}(h + W h)$ with W = 0 at init, no norm (the
  control C06 needs: skip connections without normalization);
- `res_bn`: residual blocks with BN, gamma = 0 at init.

MLPs rather than CNNs: a 50-layer plain CNN costs too much for a CPU-hour; depth is what the claim is
about. Equal compute: the same step budget and batches (seed) for every cell; each cell at each lr of
a small grid (`lrs`), SGD with momentum 0.9, constant lr (steps-to-target is not shaped by a
schedule), 3 seeds. The global gradient norm is logged per row (`grad_norm`, C06).

Metrics per run: `test_error` (percent, full test set), `train_error`, `train_loss`, `test_loss`,
`steps`, `diverged`, `lr`, `steps_to_target` (first evaluated step with test error <= `target_error`,
None if never: the "24 h vs 4 h" shape at equal compute per step), `data_source`, `n_train`,
`n_test`. (Compute per step differs between archs: BN adds time; see `normlab.experiments.norm_speed`.)

Readers: `best_lr`, `trains`, `steps_to_target_at_best`, `slowdown`, `error_gap`, `table`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.small import DeepMLP
from ..stats import Interval, paired_difference
from ..train import log_grad_norm
from ..utils import seed_all
from . import _claims
from .. import results

#: arch -> (norm, residual)
ARCHS: dict[str, tuple[str, bool]] = {"plain_none": ("none", False), "plain_bn": ("bn", False),
                                      "res_none": ("none", True), "res_bn": ("bn", True)}

_COMMON: dict[str, Any] = {
    "dataset": "fashion_mnist", "archs": list(ARCHS), "width": 128, "batch_size": 128, "momentum": 0.9,
    "weight_decay": 1e-4, "schedule": "constant", "warmup_steps": 0, "subset_seed": 1234,
    "trainable_error": 20.0,  # a cell "trains" if every seed at its best lr ends below this test error
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**_COMMON, "width": 16, "depths": [2, 4], "lrs": [0.01, 0.1], "seeds": [0], "n_train": 256,
              "n_test": 128, "n_eval": 64, "batch_size": 32, "steps": 12, "eval_every": 6, "target_error": 85.0,
              "trainable_error": 90.0},
    # 4 archs x 4 depths x 6 lrs x 3 seeds x 1000 steps of 128 images (2.1 epochs); test error every 50 steps
    # on 2000 test images, at the end on all. In trial runs (seed 0) the 50-layer plain BN net stayed
    # above 50% error at every lr from 0.001 to 0.1, hence the grid's low end
    "cpu": {**_COMMON, "depths": [5, 10, 20, 50], "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3], "seeds": [0, 1, 2],
            "n_train": None, "n_test": None, "n_eval": 2000, "steps": 1000, "eval_every": 50, "target_error": 15.0},
}


def check_config(config: dict[str, Any]) -> None:
    _claims.check_choice("archs", config["archs"], ARCHS)
    _claims.check_lrs(config["lrs"])
    _claims.check_target(config["target_error"])
    _claims.check_target(config["trainable_error"], "trainable_error")
    if not config["depths"] or any(not isinstance(d, int) or d < 1 for d in config["depths"]):
        raise ValueError(f"depths must be a non-empty list of positive integers, got {config['depths']}")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (seed, depth, lr, arch); seeds outermost, shallow nets first."""
    check_config(config)
    return [{"arch": arch, "depth": depth, "lr": lr, "seed": seed} for seed in config["seeds"]
            for depth in config["depths"] for lr in config["lrs"] for arch in config["archs"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    check_config(config)
    _claims.check_choice("arch", [run["arch"]], ARCHS)
    data = _claims.load_data(config)
    seed_all(run["seed"])  # initialization
    norm, residual = ARCHS[run["arch"]]
    model = DeepMLP(run["depth"], config["width"], norm, residual, in_features=data[0][0].numel())
    _, _, result = _claims.fit(model, run, config, data, checkpoint=checkpoint, device=device, progress=progress,
                               hooks=[log_grad_norm],
                               desc=f"{run['arch']} depth={run['depth']} lr={run['lr']} seed={run['seed']}")
    return result


# ----------------------------------------------------------------------------------------------------
# readers (record = normlab.results.load("bn_depth"))
# ----------------------------------------------------------------------------------------------------


def best_lr(record: dict[str, Any], arch: str, depth: int, criterion: str = "test_error") -> float:
    """The grid's lr with the lowest median final test error of (`arch`, `depth`) over seeds
    (`criterion="steps_to_target"`: the fewest median steps to the config's target), none diverged."""
    return _claims.best_lr(record, criterion, record["config"]["target_error"], arch=arch, depth=depth)


def trains(record: dict[str, Any], arch: str, depth: int, max_error: float | None = None) -> bool:
    """C03 "does not converge": False if at every lr some seed diverged or ended at or above `max_error`
    percent (default the config's `trainable_error`)."""
    max_error = record["config"]["trainable_error"] if max_error is None else max_error
    return any(_claims.trains(record, max_error, arch=arch, depth=depth, lr=lr)
               for lr in _claims.grid(record, "lr", arch=arch, depth=depth))


def steps_to_target_at_best(record: dict[str, Any], arch: str, depth: int, target_error: float | None = None,
                            criterion: str = "test_error") -> dict[int, int | None]:
    """`{seed: steps}` to `target_error` (default the config's) at `best_lr`; None where never reached."""
    target = record["config"]["target_error"] if target_error is None else target_error
    lr = best_lr(record, arch, depth, criterion)
    return {r["seed"]: _claims.steps_to_target(r["history"], target)
            for r in results.runs_where(record, arch=arch, depth=depth, lr=lr)}


def slowdown(record: dict[str, Any], depth: int, slow: str = "plain_none", fast: str = "plain_bn",
             target_error: float | None = None, criterion: str = "test_error") -> Interval:
    """C03's "24 h vs 4 h" (a 6x slowdown) at `depth`: steps to the target of `slow` over `fast`, each at
    its best lr; geometric mean over seeds with a t interval on the logs. ValueError if a seed never
    reached the target (then `trains` / `steps_to_target_at_best` say how far it got)."""
    return _claims.ratio_across_seeds(steps_to_target_at_best(record, slow, depth, target_error, criterion),
                                      steps_to_target_at_best(record, fast, depth, target_error, criterion))


def error_gap(record: dict[str, Any], depth: int, arch: str = "plain_none", reference: str = "plain_bn") -> Interval:
    """Final test error of `arch` minus `reference` (points) at `depth`, each at its best lr, paired by seed."""
    a = results.by_seed(record, "test_error", arch=arch, depth=depth, lr=best_lr(record, arch, depth))
    b = results.by_seed(record, "test_error", arch=reference, depth=depth, lr=best_lr(record, reference, depth))
    return paired_difference(a, b)


def table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (depth, arch): trains?, best lr, median final test error and steps-to-target (None if
    a seed never reached the target; `None` lr if it diverged at every lr)."""
    import statistics

    rows = []
    for depth in record["config"]["depths"]:
        for arch in record["config"]["archs"]:
            try:
                lr = best_lr(record, arch, depth)
            except ValueError:
                rows.append({"depth": depth, "arch": arch, "trains": False, "lr": None})
                continue
            steps = list(steps_to_target_at_best(record, arch, depth).values())
            errors = results.by_seed(record, "test_error", arch=arch, depth=depth, lr=lr).values()
            rows.append({"depth": depth, "arch": arch, "trains": trains(record, arch, depth), "lr": lr,
                         "test_error": statistics.median(errors),
                         "steps_to_target": None if None in steps else statistics.median(steps)})
    return rows
