"""How many batches do BatchNorm's running averages need to converge? Claim C19.

C19: "BN's running statistics need many epochs (about 50) to converge; 5 are too few". The running
averages depend only on the weights and the data, so their convergence can be measured apart from
training: train the BN net of `lr_by_norm` (`normlab.models.small.NormCNN("bn", ...)`) on
Fashion-MNIST for `steps` steps (SGD, cosine, seeded), freeze the weights, reset every BN's running
mean and variance (to 0 and 1, as torch does), and feed `k` training batches (`batch_size` images,
a seeded random order, whole epochs' permutations) in train mode without gradients, with BN momentum
0.1 (torch's default), 0.01, or `None` (the cumulative average). At each `k` of `ks` the net is
evaluated in eval mode on the whole test set, and the running averages are compared with the
population statistics: precise BN {cite}`wu2021rethinking`, the cumulative average over every whole
batch (`batch_size` images, in order) of the training set (`normlab.norms.recompute_batchnorm_stats`):
the reference the claim's "converged" can only mean. One run per seed (a separately trained net, its own feed order; every
momentum sees the same batches).

Distances, averaged over all BN channels of the net: `mean_dist` = |mu - mu*| / sigma* (the running
mean's error in units of the population std), `var_dist` = |log((var + eps) / (var* + eps))|.

Metrics per run: `test_error` (eval mode with the running averages training left, momentum 0.1),
`test_error_precise_bn` (with the population statistics), `steps_per_epoch`, the trainer's
`train_error`, `train_loss`, `steps`, `diverged`, `data_source`, `n_train`, `n_test`, and
`recalibration`: one row per (momentum, k) with `momentum`, `k`, `epochs` (= k / steps_per_epoch),
`test_error`, `mean_dist`, `var_dist`.

Readers: `curve`, `batches_to_precise`, `epochs_to_precise`, `precise_bn_gap`.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..models.small import NormCNN
from ..norms import _BatchNorm, recompute_batchnorm_stats
from ..stats import Interval, paired_difference
from ..utils import seed_all
from . import _claims

_COMMON: dict[str, Any] = {
    "dataset": "fashion_mnist", "widths": [16, 16, 32, 32, 64, 64], "strides": [2, 1, 2, 1, 2, 1],
    "gn_groups": 8, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
    "warmup_steps": 0, "subset_seed": 1234, "bn_momenta": [0.1, 0.01, None],
    "feed_seed": 10_000,  # the feed order of seed s comes from a generator seeded with feed_seed + s
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**_COMMON, "widths": [8, 8, 16], "strides": [2, 2, 2], "batch_size": 32, "n_train": 256,
              "n_test": 128, "n_eval": 64, "steps": 12, "eval_every": 6, "ks": [1, 2, 5, 10], "seeds": [0]},
    # 1000 training steps (2.1 epochs), then up to 500 batches (1.07 epochs) per momentum, 3 seeds
    "cpu": {**_COMMON, "n_train": None, "n_test": None, "n_eval": 2000, "steps": 1000, "eval_every": 250,
            "ks": [1, 2, 5, 10, 20, 50, 100, 200, 500], "seeds": [0, 1, 2]},
}


def check_config(config: dict[str, Any]) -> None:
    ks = config["ks"]
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or sorted(set(ks)) != list(ks):
        raise ValueError(f"ks must be a non-empty increasing list of positive integers, got {ks}")
    bad = [m for m in config["bn_momenta"] if m is not None and not 0 < m <= 1]
    if not config["bn_momenta"] or bad:
        raise ValueError(f"bn_momenta must be a non-empty list of numbers in (0, 1] or None (cumulative), "
                         f"got {config['bn_momenta']}")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per seed (each trains its own net, then measures every momentum)."""
    check_config(config)
    return [{"seed": seed} for seed in config["seeds"]]


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def population_stats(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Precise BN: every BN's (mean, var) averaged over `batches` (`recompute_batchnorm_stats`), which
    are then the model's running averages; returns copies of them, one pair per BN layer."""
    recompute_batchnorm_stats(model, batches)
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorms(model)]


def stat_distance(model: nn.Module, reference: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """`mean_dist` = mean over all BN channels of |mu - mu*| / sqrt(var* + eps) and `var_dist` = mean of
    |log((var + eps) / (var* + eps))| between the model's running averages and `reference`."""
    bns = batchnorms(model)
    if len(bns) != len(reference):
        raise ValueError(f"the model has {len(bns)} BN layers but the reference {len(reference)}")
    mean_d, var_d = [], []
    for bn, (mu, var) in zip(bns, reference):
        mean_d.append((bn.running_mean - mu).abs() / (var + bn.eps).sqrt())
        var_d.append(((bn.running_var + bn.eps) / (var + bn.eps)).log().abs())
    return {"mean_dist": float(torch.cat(mean_d).mean()), "var_dist": float(torch.cat(var_d).mean())}


def random_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless whole batches of `images`: a fresh random permutation every epoch (the last partial batch dropped)."""
    n = len(images) - len(images) % batch_size
    while True:
        perm = torch.randperm(len(images), generator=generator).to(images.device)
        for i in range(0, n, batch_size):
            yield images[perm[i: i + batch_size]]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterator[torch.Tensor], momentum: float | None, ks: list[int],
                measure) -> list[dict[str, Any]]:
    """Reset every BN's running averages, set its momentum, feed `batches` in train mode and call
    `measure()` (eval mode) after `k` batches for each `k` of `ks`; returns `[{"k", **measure()}]`.
    The BN momenta are restored and the model left in eval mode."""
    bns = batchnorms(model)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = momentum
    rows, fed = [], 0
    try:
        for k in ks:
            model.train()
            while fed < k:
                model(next(batches))
                fed += 1
            model.eval()
            rows.append({"k": k, **measure()})
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.eval()
    return rows


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    check_config(config)
    data = _claims.load_data(config)
    trx, try_, tex, tey, _ = data
    seed_all(run["seed"])  # initialization
    model = NormCNN("bn", config["widths"], config["strides"], in_channels=trx.shape[1])
    trainer, task, result = _claims.fit(model, {"lr": config["lr"], **run}, config, data, checkpoint=checkpoint,
                                        device=device, progress=progress, desc=f"running_stats seed={run['seed']}")
    metrics = result["metrics"]
    if trainer.diverged:
        return result
    model, b = trainer.model, config["batch_size"]
    images = task.normalize(task.x)  # all training images, normalized once (no augmentation)
    steps_per_epoch = len(images) // b
    reference = population_stats(model, (images[i: i + b] for i in range(0, steps_per_epoch * b, b)))
    metrics["test_error_precise_bn"] = _claims.evaluate(trainer, task, tex, tey)["test_error"]
    metrics["steps_per_epoch"] = steps_per_epoch

    def measure():
        return {"test_error": _claims.evaluate(trainer, task, tex, tey)["test_error"],
                **stat_distance(model, reference)}

    rows = []
    for momentum in config["bn_momenta"]:
        gen = torch.Generator().manual_seed(config["feed_seed"] + run["seed"])  # the same batches for each momentum
        for row in recalibrate(model, random_batches(images, b, gen), momentum, config["ks"], measure):
            rows.append({"momentum": momentum, "k": row["k"], "epochs": row["k"] / steps_per_epoch, **row})
    metrics["recalibration"] = rows
    return result


# ----------------------------------------------------------------------------------------------------
# readers (record = normlab.results.load("running_stats")); momentum None means the cumulative average
# ----------------------------------------------------------------------------------------------------


def curve(record: dict[str, Any], momentum: float | None, metric: str = "test_error") -> dict[int, dict[int, float]]:
    """`{k: {seed: metric}}` after k batches at BN `momentum` (`metric`: test_error, mean_dist, var_dist)."""
    out: dict[int, dict[int, float]] = {}
    for r in record["runs"]:
        for row in r["metrics"].get("recalibration", []):
            if row["momentum"] == momentum:
                out.setdefault(row["k"], {})[r["seed"]] = row[metric]
    if not out:
        raise ValueError(f"no recalibration rows with momentum {momentum!r}; the record has "
                         f"{record['config']['bn_momenta']}")
    return dict(sorted(out.items()))


def _tolerance(record: dict[str, Any], tolerance: float | str) -> float:
    if tolerance == "spread":  # the seed-to-seed spread of the precise-BN error itself
        values = [r["metrics"]["test_error_precise_bn"] for r in record["runs"]
                  if "test_error_precise_bn" in r["metrics"]]
        return max(values) - min(values)
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance is in points of test error (>= 0) or 'spread', got {tolerance!r}")
    return float(tolerance)


def batches_to_precise(record: dict[str, Any], momentum: float | None,
                       tolerance: float | str = 0.1) -> dict[int, int | None]:
    """`{seed: k}`: the smallest recorded k from which on (at every larger recorded k too) the test
    error is within `tolerance` points of that seed's precise-BN error; None if it never settles.
    `tolerance="spread"`: the max - min over seeds of the precise-BN errors."""
    tol = _tolerance(record, tolerance)
    precise = {r["seed"]: r["metrics"]["test_error_precise_bn"] for r in record["runs"]
               if "test_error_precise_bn" in r["metrics"]}  # a diverged run has none
    by_k = curve(record, momentum)
    out: dict[int, int | None] = {}
    for seed, ref in precise.items():
        settled = None
        for k in sorted(by_k, reverse=True):  # walk back from the largest k while it stays within
            if abs(by_k[k][seed] - ref) > tol + 1e-9:  # slack for float rounding of percentages
                break
            settled = k
        out[seed] = settled
    return out


def epochs_to_precise(record: dict[str, Any], momentum: float | None,
                      tolerance: float | str = 0.1) -> dict[int, float | None]:
    """`batches_to_precise` in epochs of the training set (k / steps_per_epoch at the recorded batch size)."""
    spe = {r["seed"]: r["metrics"]["steps_per_epoch"] for r in record["runs"]}
    return {s: None if k is None else k / spe[s] for s, k in batches_to_precise(record, momentum, tolerance).items()}


def precise_bn_gap(record: dict[str, Any]) -> Interval:
    """Test error with the running averages training left minus with precise BN (points), paired by seed."""
    return paired_difference({r["seed"]: r["metrics"]["test_error"] for r in record["runs"]},
                             {r["seed"]: r["metrics"]["test_error_precise_bn"] for r in record["runs"]})

