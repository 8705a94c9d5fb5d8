"""Does BN regularize on small data, does LayerNorm overfit, is LN worse than BN on images? C04, C16.

C04: "BN regularizes: 5-10% better on small data sets; LayerNorm overfits more for lack of that
noise"; C16: "LayerNorm is 1-2% worse than BN on image classification". The CNN of `lr_by_norm`
(`normlab.models.small.NormCNN`) with BN, GroupNorm, LayerNorm (GroupNorm with one group) and no norm,
trained on nested random subsets of Fashion-MNIST (`sizes` images; a smaller set is part of every
larger one), each size for its own step budget (`steps`, one per size: many epochs on the small sets,
so every run ends on its plateau), SGD with momentum 0.9, cosine decay, no augmentation, 3 seeds.

Each norm is trained at each lr of its own small grid (`lrs[norm]`, around its best lr in
`lr_by_norm`'s trial runs); the readers pick, per norm and size, the lr with the lowest median
*validation* error, on `n_val` training images outside every subset, so the test set chooses nothing.

Metrics per run: `test_error` (percent, full test set), `val_error`, `train_error_eval` (eval mode,
the whole training subset), `generalization_gap` = test_error - train_error_eval (points), the
trainer's `train_error` and `train_loss` (last row, train mode), `test_loss`, `steps`, `diverged`, `lr`,
and `data_source`, `n_train`, `n_test`.

Readers: `best_lr`, `at_best`, `paired_gap` (norm minus BN at one size, paired by seed; with
`metric="generalization_gap"` the difference in overfitting), `generalization_gap`, `table`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.small import NormCNN
from ..stats import Interval, paired_difference
from ..utils import seed_all
from . import _claims
from .. import results
from .lr_by_norm import NORMS

_COMMON: dict[str, Any] = {
    "dataset": "fashion_mnist", "norms": list(NORMS), "widths": [16, 16, 32, 32, 64, 64],
    "strides": [2, 1, 2, 1, 2, 1], "gn_groups": 8, "batch_size": 128, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "cosine", "warmup_steps": 0, "subset_seed": 1234, "n_test": None,
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**_COMMON, "widths": [8, 8, 16], "strides": [2, 2, 2], "gn_groups": 4, "batch_size": 32,
              "sizes": [64, 256], "steps": [8, 12], "n_val": 128, "n_test": 128, "n_eval": 64, "eval_every": 4,
              "lrs": {"bn": [0.1], "gn": [0.1], "ln": [0.1], "none": [0.03]}, "seeds": [0]},
    # 4 norms x 2 lrs x 3 sizes x 3 seeds; 1k images: 400 steps (51 epochs), 4k: 800 (26), 16k: 1600 (13);
    # the lrs bracket each norm's best in lr_by_norm's trial runs (constant lr; cosine here tolerates more)
    "cpu": {**_COMMON, "sizes": [1000, 4000, 16000], "steps": [400, 800, 1600], "n_val": 5000, "n_eval": 2000,
            "eval_every": 100,
            "lrs": {"bn": [0.1, 0.3], "gn": [0.1, 0.3], "ln": [0.1, 0.3], "none": [0.03, 0.1]},
            "seeds": [0, 1, 2]},
}


def check_config(config: dict[str, Any]) -> None:
    norms = _claims.check_choice("norms", config["norms"], NORMS)
    for norm in norms:
        if norm not in config["lrs"]:
            raise ValueError(f"no learning-rate grid for {norm!r}: add lrs[{norm!r}] = [...] to the config")
        _claims.check_lrs(config["lrs"][norm], f"lrs[{norm!r}]")
    if not config["sizes"] or len(config["sizes"]) != len(config["steps"]):
        raise ValueError(f"give one step budget per training-set size (sizes {config['sizes']}, "
                         f"steps {config['steps']})")
    if any(n < config["batch_size"] for n in config["sizes"]):
        raise ValueError(f"every size must hold at least one batch of {config['batch_size']} images")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (seed, size, norm, lr); seeds outermost."""
    check_config(config)
    return [{"norm": norm, "n_train": n, "lr": lr, "seed": seed} for seed in config["seeds"]
            for n in config["sizes"] for norm in config["norms"] for lr in config["lrs"][norm]]


def load_data(config: dict[str, Any], n_train: int):
    """(train_x, train_y, val_x, val_y, test_x, test_y, source): the first `n_train` images of one fixed
    permutation of the training set (so the sizes nest), and its last `n_val` images for validation."""
    trx, try_, tex, tey, source = _claims.load_data({**config, "n_train": None})
    perm = torch.randperm(len(trx), generator=torch.Generator().manual_seed(config["subset_seed"]))
    if n_train + config["n_val"] > len(trx):
        raise ValueError(f"n_train {n_train} + n_val {config['n_val']} exceed the {len(trx)} training images")
    train, val = perm[:n_train], perm[len(trx) - config["n_val"]:]
    return trx[train], try_[train], trx[val], try_[val], tex, tey, source


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    check_config(config)
    _claims.check_choice("norm", [run["norm"]], NORMS)
    trx, try_, vax, vay, tex, tey, source = load_data(config, run["n_train"])
    seed_all(run["seed"])  # initialization
    model = NormCNN(run["norm"], config["widths"], config["strides"], in_channels=trx.shape[1],
                    groups=config["gn_groups"])
    steps = config["steps"][config["sizes"].index(run["n_train"])]
    trainer, task, result = _claims.fit(
        model, run, config, (trx, try_, tex, tey, source), checkpoint=checkpoint, device=device, progress=progress,
        steps=steps, desc=f"{run['norm']} n={run['n_train']} lr={run['lr']} seed={run['seed']}")
    metrics = result["metrics"]
    if not trainer.diverged:
        metrics["val_error"] = _claims.evaluate(trainer, task, vax, vay)["test_error"]
        metrics["train_error_eval"] = _claims.evaluate(trainer, task, trx, try_)["test_error"]
        metrics["generalization_gap"] = metrics["test_error"] - metrics["train_error_eval"]
    return result


# ----------------------------------------------------------------------------------------------------
# readers (record = normlab.results.load("small_data"))
# ----------------------------------------------------------------------------------------------------


def best_lr(record: dict[str, Any], norm: str, n_train: int) -> float:
    """The lr of `norm`'s grid with the lowest median validation error at `n_train` images (none diverged)."""
    lrs = _claims.grid(record, "lr", norm=norm, n_train=n_train)
    ok = [lr for lr in lrs if _claims.trains(record, norm=norm, n_train=n_train, lr=lr)]
    if not ok:
        raise ValueError(f"no lr of {lrs} trained {norm!r} at n_train={n_train} without diverging "
                         "(or the record has no such runs): check the names, or extend lrs[norm] downwards")
    import statistics

    return min(ok, key=lambda lr: (statistics.median(
        results.by_seed(record, "val_error", norm=norm, n_train=n_train, lr=lr).values()), lr))


def at_best(record: dict[str, Any], norm: str, n_train: int, metric: str = "test_error") -> dict[int, float]:
    """`{seed: metric}` of `norm` at `n_train` images and its `best_lr`."""
    return results.by_seed(record, metric, norm=norm, n_train=n_train, lr=best_lr(record, norm, n_train))


def paired_gap(record: dict[str, Any], norm: str, n_train: int, reference: str = "bn",
               metric: str = "test_error") -> Interval:
    """`norm` minus `reference` in `metric` (points) at `n_train` images, each at its own `best_lr`,
    paired by seed (same data order), as a `normlab.stats.Interval`. C04: `paired_gap(r, "none", 1000)`
    > 0 means BN helps; C16: `paired_gap(r, "ln", n)`; "LN overfits more":
    `paired_gap(r, "ln", n, metric="generalization_gap")` > 0."""
    return paired_difference(at_best(record, norm, n_train, metric), at_best(record, reference, n_train, metric))


def generalization_gap(record: dict[str, Any], norm: str, n_train: int) -> Interval:
    """Test error minus eval-mode training error (points) of `norm` at `n_train`, its `best_lr`, over seeds."""
    return paired_difference(at_best(record, norm, n_train, "test_error"),
                             at_best(record, norm, n_train, "train_error_eval"))


def table(record: dict[str, Any], reference: str = "bn") -> list[dict[str, Any]]:
    """One row per (size, norm): best lr, mean test error, gap to `reference` (Interval), generalization gap."""
    import statistics

    rows = []
    for n in record["config"]["sizes"]:
        for norm in record["config"]["norms"]:
            rows.append({"n_train": n, "norm": norm, "lr": best_lr(record, norm, n),
                         "test_error": statistics.mean(at_best(record, norm, n).values()),
                         "minus_reference": None if norm == reference else paired_gap(record, norm, n, reference),
                         "generalization_gap": generalization_gap(record, norm, n)})
    return rows
