"""WeightNorm vs weight standardization (alone, scaled, with GroupNorm) vs BatchNorm: a small CNN on Fashion-MNIST.

Weight normalization (Salimans & Kingma, 2016) and weight standardization (Qiao et al., 2019) normalize
the *weights* instead of the activations. This experiment trains the same small CNN (three 3x3
stride-2 convolutions with ReLU, global average pooling, a linear classifier) with

- `plain`: no normalization (He init, as every variant);
- `wn`: every convolution reparametrized as w = g v / ||v|| (`normlab.norms.weight_norm`);
- `ws`: every convolution weight-standardized (`normlab.norms.WSConv2d`), no activation norm;
- `sws`: scaled WS of NF-ResNets (Brock et al., 2021; `normlab.norms.ScaledStdConv2d`), no activation norm;
- `ws_gn`: WS convolutions followed by GroupNorm, Qiao et al.'s recipe;
- `bn`: plain convolutions followed by BatchNorm, the reference.

Same data order, steps, optimizer (SGD with momentum, warmup + cosine) and schedule for every variant,
several seeds, on `normlab.train.Trainer` (no augmentation). The models are `normlab.models.small`'s.

Two kinds of profile:

- `smoke`, `cpu`, `full`: one lr shared by every variant, a step budget, `seeds` for every variant.
- profiles with an `lr_grid` (`cpu_converged`, and its `smoke_converged`): each variant at *its own*
  lr, trained for `epochs` epochs (a history row per epoch, with validation and test error). The record
  holds two phases. `"phase": "sweep"` runs train each variant at every lr of `lr_grid[variant]` with
  the `sweep_seeds`; `"phase": "final"` runs train it with `seeds[variant]` at the lr whose sweep runs
  reached the lowest median *validation* error (`n_val` training images held out by `split_seed`, never
  the test set; no lr at which a sweep seed diverged). A final run reads that choice from the record
  it is written to (`run_one(..., record=...)`, which `normlab.sweep` passes; `NotReady` until the
  sweep runs are there); it records the lr and the sweep it came from. Sweep and final seeds
  are disjoint, so the test error of a final run is not that of the run that chose its lr.

Readers of such a record (`record = normlab.results.load("wn_ws_training", "cpu_converged")`):
`sweep_table`, `chosen_lrs`, `test_errors`, `difference` (paired by seed, an `Interval`), `claims`
(rows for `normlab.stats.verdict_table`), `trains_at_any_lr` (does WS alone train at some lr?) and
`flatness` (the change of test error over the last 20% of training), `curves` (test error or training loss by
epoch, over seeds) and `findings` (the results as sentences).
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping

import torch

from .. import data, selection
from ..results import band, finished
from ..models.small import VARIANTS, SmallCNN
from ..stats import DOES_NOT_HOLD, HOLDS, NOT_TESTED, Interval, paired_difference, seed_verdict
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig, log_grad_norm
from ..utils import seed_all
from . import NotReady

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: a data subset, a narrow net, a dozen steps; proves the code path, learns little
    "smoke": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0],
              "widths": [8, 16, 16], "groups": 4, "n_train": 512, "n_test": 256, "n_eval": 256,
              "steps": 12, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
              "warmup_steps": 2, "eval_every": 6},
    # ~10 min on one CPU thread: 12 runs x 800 steps of batch 64 (~0.85 epoch), curves on 2000 test images
    "cpu": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0, 1],
            "widths": [16, 32, 64], "groups": 8, "n_train": None, "n_test": None, "n_eval": 2000,
            "steps": 800, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
            "warmup_steps": 40, "eval_every": 50},
    # a GPU: wider, ~8.5 epochs, three seeds, curves on the whole test set
    "full": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0, 1, 2],
             "widths": [32, 64, 128], "groups": 8, "n_train": None, "n_test": None, "n_eval": None,
             "steps": 4000, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
             "warmup_steps": 200, "eval_every": 200},
}

_FIVE, _THREE = [0, 1, 2, 3, 4], [0, 1, 2]
_CONVERGED: dict[str, Any] = {
    "dataset": "fashion_mnist", "variants": list(VARIANTS), "widths": [16, 32, 64], "groups": 8,
    "n_train": None, "n_val": 5000, "n_test": None, "split_seed": 1234,
    "batch_size": 64, "momentum": 0.9, "weight_decay": 0.0, "warmup_epochs": 0.5,
    "sweep_seeds": [100],
    # the half-width (points of test error) within which "matches" / "makes no difference" holds
    "margin": 0.5,
    # a run "trains" when its validation error is below this (chance is 90%)
    "trains_below": 50.0,
}

PROFILES.update({
    # seconds: both phases end to end (2 lrs per variant, 2 final seeds), 2 epochs of 512 images
    "smoke_converged": {**_CONVERGED, "widths": [8, 16, 16], "groups": 4, "n_train": 512, "n_val": 256,
                        "n_test": 256, "batch_size": 32, "epochs": 2, "warmup_epochs": 0.25,
                        "lr_grid": {v: [0.01, 0.05] for v in VARIANTS} | {"ws": [0.0003, 0.003]},
                        "seeds": {v: [0, 1] for v in VARIANTS}},
    # every variant at its own lr, 20 epochs to the end of a cosine schedule (trial runs at 15 epochs
    # still moved 0.1-0.2 points over the last three): a sweep of half-decade lrs (one seed, the whole
    # budget, 55k training images, the lr chosen on 5k held-out ones), then 5 seeds where the effect in
    # question is small (WS+GN vs BN, WN vs plain) and 3 elsewhere. WS alone's grid reaches 3e-5, far
    # below the 0.05 at which the `cpu` profile's WS runs never left chance. 59 runs, ~3.2 CPU-hours
    # (`cpu_hours`): two single-thread processes, ~1.6 h.
    "cpu_converged": {**_CONVERGED, "epochs": 20,
                      "lr_grid": {"plain": [0.003, 0.01, 0.03, 0.1, 0.3], "wn": [0.003, 0.01, 0.03, 0.1, 0.3],
                                  "ws": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1],
                                  "sws": [0.003, 0.01, 0.03, 0.1, 0.3], "ws_gn": [0.01, 0.03, 0.1, 0.3, 1.0],
                                  "bn": [0.01, 0.03, 0.1, 0.3, 1.0]},
                      "seeds": {"plain": _FIVE, "wn": _FIVE, "ws": _THREE, "sws": _THREE, "ws_gn": _FIVE,
                                "bn": _FIVE}},
})


#: Seconds per epoch (55k images, batch 64, widths [16, 32, 64], with the epoch's evaluation of 15k
#: images) on one thread of the book's shared 2-core AMD EPYC, measured while other jobs ran (pessimistic).
EPOCH_S = {"plain": 7.0, "wn": 7.8, "ws": 7.8, "sws": 8.2, "ws_gn": 13.5, "bn": 13.9}


def cpu_hours(config: Mapping[str, Any], epoch_s: Mapping[str, float] = EPOCH_S) -> float:
    """Estimated single-thread CPU-hours of a per-variant-lr profile: every run for all `epochs` (diverged
    runs stop early, so this is an upper bound), at `epoch_s` seconds per 55k-image epoch, scaled by
    the training images."""
    check_config(config)
    scale = (config["n_train"] or (60000 - config["n_val"])) / 55000  # Fashion-MNIST: 60k training images
    counts = {v: 0 for v in config["variants"]}
    for r in runs(dict(config)):
        counts[r["variant"]] += 1
    return sum(n * config["epochs"] * epoch_s[v] * scale for v, n in counts.items()) / 3600


def converged(config: Mapping[str, Any]) -> bool:
    """Whether `config` is a per-variant-lr profile (it has an `lr_grid`), else one lr for all."""
    return "lr_grid" in config


def check_config(config: Mapping[str, Any]) -> None:
    """A ValueError naming the fix for an inconsistent per-variant-lr profile (no-op for the others)."""
    from . import _claims

    if not converged(config):
        return
    variants = _claims.check_choice("variants", config["variants"], VARIANTS)
    for name in ("lr_grid", "seeds"):
        if not isinstance(config.get(name), Mapping):
            raise ValueError(f"config[{name!r}] must be a dict keyed by variant, e.g. {{'bn': [...], ...}}")
    sweep_seeds = list(config["sweep_seeds"])
    if not sweep_seeds:
        raise ValueError("sweep_seeds is empty: give at least one seed for the lr sweep, e.g. [100]")
    for v in variants:
        if v not in config["lr_grid"]:
            raise ValueError(f"no lr grid for variant {v!r}: add lr_grid[{v!r}] = [...] to the config")
        _claims.check_lrs(config["lr_grid"][v], f"lr_grid[{v!r}]")
        seeds = list(config["seeds"].get(v, []))
        if len(set(seeds)) < 2:
            raise ValueError(f"seeds[{v!r}] = {seeds}: give at least 2 distinct seeds (3-5 for the book) so "
                             "that paired differences have an interval")
        shared = sorted(set(seeds) & set(sweep_seeds))
        if shared:
            raise ValueError(f"seeds {shared} of variant {v!r} are also sweep_seeds: the run that chose the lr "
                             "would be scored on the test set too; use disjoint seeds (e.g. sweep_seeds [100])")
    if not (isinstance(config["epochs"], int) and config["epochs"] >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {config['epochs']!r}")
    if not (isinstance(config["n_val"], int) and config["n_val"] >= 1):
        raise ValueError(f"n_val must be a positive number of held-out training images, got {config['n_val']!r}")
    if not (isinstance(config["margin"], (int, float)) and config["margin"] > 0):
        raise ValueError(f"margin must be a positive number of points, got {config['margin']!r}")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (seed, variant); seeds outermost so a cut-short sweep still covers every variant.

    A per-variant-lr profile: first the lr sweep (variant by variant, so the final runs of the first
    variants can start while the last sweep runs are in flight), then the final runs, seeds outermost.
    """
    if not converged(config):
        return [{"variant": v, "seed": s} for s in config["seeds"] for v in config["variants"]]
    check_config(config)
    variants = config["variants"]
    sweep = [{"phase": "sweep", "variant": v, "lr": lr, "seed": s}
             for v in variants for lr in config["lr_grid"][v] for s in config["sweep_seeds"]]
    seeds = sorted({s for v in variants for s in config["seeds"][v]})
    final = [{"phase": "final", "variant": v, "seed": s} for s in seeds for v in variants if s in config["seeds"][v]]
    return sweep + final


def load_data(config: dict[str, Any]):
    """(train images, train labels, test images, test labels, source): uint8, optional leading subsets."""
    if config["dataset"] not in ("fashion_mnist", "cifar10"):
        raise ValueError(f"unknown dataset {config['dataset']!r}; choose fashion_mnist or cifar10")
    split = getattr(data, config["dataset"])()
    return (split.train_images[: config["n_train"]], split.train_labels[: config["n_train"]],
            split.test_images[: config["n_test"]], split.test_labels[: config["n_test"]], split.source)


def train_config(run: dict[str, Any], config: dict[str, Any]) -> TrainConfig:
    """SGD with momentum, linear warmup then cosine decay to zero, a step budget; the same for every variant."""
    return TrainConfig(steps=config["steps"], epochs=None, batch_size=config["batch_size"], lr=config["lr"],
                       momentum=config["momentum"], weight_decay=config["weight_decay"], schedule="cosine",
                       warmup=config["warmup_steps"], eval_every=config["eval_every"], seed=run["seed"])


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None, record=None) -> dict[str, Any]:
    """Train one variant with one seed; curves on the first `n_eval` test images, final metrics on all.

    Per-variant-lr profiles: see `run_converged` (`record` is only needed by their final runs).
    """
    if converged(config):
        return run_converged(run, config, device, progress, checkpoint, record)
    xtr, ytr, xte, yte, source = load_data(config)
    n_eval = config["n_eval"] or len(xte)
    task = ImageClassification(xtr, ytr, xte[:n_eval], yte[:n_eval], augment=False)
    seed_all(run["seed"])  # same seed -> same init stream and same batch order for every variant
    model = SmallCNN(run["variant"], config["widths"], in_channels=xtr.shape[1], groups=config["groups"])
    trainer = Trainer(model, task, train_config(run, config), hooks=[log_grad_norm], checkpoint=checkpoint,
                      device=device)
    history = trainer.fit(progress=progress, desc=f"{run['variant']} seed={run['seed']}")
    final = ImageClassification(xtr, ytr, xte, yte, augment=False, mean=task.mean, std=task.std).to(trainer.device)
    test = final.evaluate(trainer.model)
    metrics = {**test, "train_loss": history[-1]["train_loss"], "diverged": trainer.diverged, "steps": trainer.step,
               "n_params": sum(p.numel() for p in model.parameters()), "n_train": len(xtr), "n_test": len(xte),
               "data_source": source}
    return {"metrics": metrics, "history": history}


# ----------------------------------------------------------------------------------------------------
# per-variant-lr profiles: a validation split, the lr sweep, final runs at the chosen lr
# ----------------------------------------------------------------------------------------------------

_SPLIT_CACHE: dict[tuple, tuple] = {}


def load_split(config: Mapping[str, Any]):
    """(train_x, train_y, val_x, val_y, test_x, test_y, source): `n_val` training images held out by
    `normlab.data.holdout` with `split_seed` (the same for every run), the rest (or `n_train` of them) to
    train on, and the first `n_test` test images (None: all). Cached per process."""
    key = tuple(config[k] for k in ("dataset", "n_train", "n_val", "n_test", "split_seed"))
    if key not in _SPLIT_CACHE:
        trx, try_, tex, tey, source = load_data({**config, "n_train": None})
        train, val_x, val_y = data.holdout(data.Split(trx, try_, tex, tey, source), config["n_val"],
                                           config["split_seed"], config["n_train"])
        _SPLIT_CACHE.clear()
        _SPLIT_CACHE[key] = (train.train_images, train.train_labels, val_x, val_y, tex, tey, source)
    return _SPLIT_CACHE[key]


def converged_train_config(run: Mapping[str, Any], config: Mapping[str, Any], lr: float) -> TrainConfig:
    """SGD with momentum at `lr`, `warmup_epochs` of linear warmup, cosine to zero over `epochs`, a
    history row (with validation and test error) every epoch."""
    return TrainConfig(epochs=config["epochs"], steps=None, batch_size=config["batch_size"], lr=lr,
                       momentum=config["momentum"], weight_decay=config["weight_decay"], schedule="cosine",
                       warmup=config["warmup_epochs"], eval_every=1, seed=run["seed"])


def lr_table(sweep_runs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`[{"lr", "val_error", "n", "diverged"}]` by lr (`normlab.selection.lr_table`): the median validation
    error over the seeds (None if a seed diverged) of recorded sweep runs of one variant."""
    return selection.lr_table(selection.sweep_scores(sweep_runs), name="val_error")


def select_lr(sweep_runs: list[Mapping[str, Any]], variant: str = "") -> tuple[float, list[dict[str, Any]]]:
    """The lr `normlab.selection.choose_lr` picks from `sweep_runs` (recorded runs of one variant: the lowest
    median validation error among lrs at which no seed diverged, ties to the smaller lr), and the table it
    was chosen from (`lr_table`). The same rule for the final runs and the readers, so both name the same lr."""
    scores = selection.sweep_scores(sweep_runs)
    try:
        lr = selection.choose_lr(scores, repr(variant))
    except ValueError as e:
        raise ValueError(f"{e}: lr_grid[{variant!r}] in normlab/experiments/wn_ws_training.py") from None
    return lr, selection.lr_table(scores, name="val_error")


def _sweep_keys(config: Mapping[str, Any], variant: str) -> list[str]:
    from ..results import run_key

    return [run_key(r) for r in runs(dict(config)) if r["phase"] == "sweep" and r["variant"] == variant]


def _sweep_of(variant: str, config: Mapping[str, Any], record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The recorded sweep runs of `variant` in `record` (the record as it stands: `normlab.sweep`
    passes it); `NotReady` while some are missing, so the sweep trains other runs first."""
    if record is None:
        raise ValueError(f"a final run of {variant!r} takes its lr from the recorded lr sweep: run the profile "
                         "with `python -m normlab run wn_ws_training --profile P` (normlab.sweep passes the record), "
                         "or pass record= (the loaded record)")
    keys = _sweep_keys(config, variant)
    have = {r["key"]: r for r in record["runs"]}
    missing = [k for k in keys if k not in have]
    if missing:
        raise NotReady(f"the record lacks {len(missing)} of the {len(keys)} sweep runs of {variant!r} "
                       f"(first: {missing[0]})")
    return [have[k] for k in keys]


def run_converged(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
                  progress: bool = False, checkpoint=None, record=None) -> dict[str, Any]:
    """One run of a per-variant-lr profile: a sweep run at `run["lr"]`, or a final run at the lr its
    variant's recorded sweep chose (`select_lr`; `record` is the record as it stands).

    Metrics: `test_error`/`test_loss` (percent / nats, the `n_test` test images), `val_error`/`val_loss`
    (the held-out images), `train_loss`/`train_error` (the last epoch, train mode), `diverged`, `steps`,
    `lr`, `n_params`, `n_train`, `n_val`, `n_test`, `data_source`; a final run also `lr_sweep`, the
    `[lr, median val_error]` pairs its lr was chosen from. History: one row per epoch.
    """
    check_config(config)
    if run.get("phase") not in ("sweep", "final") or run.get("variant") not in config["variants"]:
        raise ValueError(f"not a run of this profile: {run!r}; take the runs from runs(config)")
    lr_sweep = None
    if run["phase"] == "sweep":
        lr = run["lr"]
    else:
        lr, table = select_lr(_sweep_of(run["variant"], config, record), run["variant"])
        lr_sweep = [[row["lr"], row["val_error"]] for row in table]
    xtr, ytr, xva, yva, xte, yte, source = load_split(config)
    task = ImageClassification(xtr, ytr, xte, yte, augment=False, val_images=xva, val_labels=yva)
    seed_all(run["seed"])  # same seed -> same init stream and same batch order for every variant
    model = SmallCNN(run["variant"], config["widths"], in_channels=xtr.shape[1], groups=config["groups"])
    trainer = Trainer(model, task, converged_train_config(run, config, lr), hooks=[log_grad_norm],
                      checkpoint=checkpoint, device=device)
    desc = f"{run['phase']} {run['variant']} lr={lr:g} seed={run['seed']}"
    history = trainer.fit(progress=progress, desc=desc)
    last = history[-1]
    metrics = {k: last.get(k) for k in ("test_error", "test_loss", "val_error", "val_loss", "train_loss",
                                        "train_error")}
    metrics.update(diverged=trainer.diverged, steps=trainer.step, lr=lr,
                   n_params=sum(p.numel() for p in model.parameters()), n_train=len(xtr), n_val=len(xva),
                   n_test=len(xte), data_source=source)
    if lr_sweep is not None:
        metrics["lr_sweep"] = lr_sweep
    return {"metrics": metrics, "history": history}


# ----------------------------------------------------------------------------------------------------
# readers of a per-variant-lr record (record = normlab.results.load("wn_ws_training", "cpu_converged"))
# ----------------------------------------------------------------------------------------------------


def _config(record: Mapping[str, Any]) -> Mapping[str, Any]:
    config = record.get("config", {})
    if not converged(config):
        raise ValueError(f"the record of profile {record.get('profile')!r} has one lr for all variants and no lr "
                         "sweep: these readers need a per-variant-lr profile (cpu_converged, smoke_converged)")
    return config


def _phase(record: Mapping[str, Any], phase: str, variant: str) -> list[dict[str, Any]]:
    config = _config(record)
    if variant not in config["variants"]:
        raise ValueError(f"unknown variant {variant!r}: the record has {config['variants']}")
    return [r for r in record["runs"] if r["config"].get("phase") == phase and r["config"]["variant"] == variant]


def chosen_lrs(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{variant: {"lr", "val_error", "at_edge"}}`: the lr the recorded sweep chose (`select_lr`), its
    median validation error, and `"low"`/`"high"` if it is the grid's smallest/largest lr (then the
    grid may not bracket the best lr: extend it), else None. Variants without sweep runs are left out."""
    out = {}
    for v in _config(record)["variants"]:
        runs_v = _phase(record, "sweep", v)
        if not runs_v:
            continue
        lr, table = select_lr(runs_v, v)
        out[v] = {"lr": lr, "val_error": next(r["val_error"] for r in table if r["lr"] == lr),
                  "at_edge": selection.edge(lr, [row["lr"] for row in table])}
    return out


def sweep_table(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (variant, lr) of the sweep: `variant`, `lr`, `val_error` (median over sweep seeds, percent;
    None if a seed diverged), `diverged` (seeds), `chosen` (the lr the final runs use)."""
    rows = []
    for v in _config(record)["variants"]:
        runs_v = _phase(record, "sweep", v)
        if runs_v:
            lr, table = select_lr(runs_v, v)
            rows += [{"variant": v, **row, "chosen": row["lr"] == lr} for row in table]
    return rows


def _finals(record: Mapping[str, Any], variant: str, metric: str = "test_error") -> dict[int, Any]:
    """`{seed: metric}` of the final runs of `variant`, after checking they used the sweep's lr."""
    finals = _phase(record, "final", variant)
    if not finals:
        raise ValueError(f"the record has no final runs of {variant!r} yet: record them (the profile's second phase)")
    lr = select_lr(_phase(record, "sweep", variant), variant)[0]
    stale = [r["seed"] for r in finals if r["metrics"]["lr"] != lr]
    if stale:
        raise ValueError(f"final runs of {variant!r} (seeds {stale}) used another lr than the recorded sweep's {lr}: "
                         "the sweep changed after them; delete those final runs from the record and rerun")
    return {r["seed"]: r["metrics"].get(metric) for r in finals}


def test_errors(record: Mapping[str, Any], metric: str = "test_error") -> dict[str, dict[str, Any]]:
    """`{variant: {"lr", "by_seed", "mean", "sd", "min", "max", "n", "diverged"}}` of the final runs (percent
    for errors); `sd` is over seeds (None with one seed). Variants without final runs are left out."""
    out = {}
    for v in _config(record)["variants"]:
        if not _phase(record, "final", v):
            continue
        by_seed = _finals(record, v, metric)
        xs = [x for x in by_seed.values() if x is not None]
        diverged = sum(bool(r["metrics"].get("diverged")) for r in _phase(record, "final", v))
        out[v] = {"lr": _phase(record, "final", v)[0]["metrics"]["lr"], "by_seed": by_seed,
                  "mean": statistics.mean(xs) if xs else None, "sd": statistics.stdev(xs) if len(xs) > 1 else None,
                  "min": min(xs, default=None), "max": max(xs, default=None), "n": len(xs), "diverged": diverged}
    return out


def difference(record: Mapping[str, Any], variant: str, reference: str = "bn", metric: str = "test_error",
               confidence: float = 0.95) -> Interval:
    """`variant` minus `reference` in `metric` (points of test error: negative = `variant` is better),
    each at its own chosen lr, paired by seed over the seeds both have, as a `normlab.stats.Interval`."""
    a, b = _finals(record, variant, metric), _finals(record, reference, metric)
    common = [s for s in a if s in b]
    if len(common) < 2:
        raise ValueError(f"{variant!r} and {reference!r} share {len(common)} final seeds ({common}): a paired "
                         "interval needs at least 2; record more seeds of both")
    return paired_difference({s: a[s] for s in common}, {s: b[s] for s in common}, confidence=confidence)


#: The chapter's claims: (text, variant, reference, direction); the difference is variant - reference
#: in test error, so "less" means the variant has the lower error.
CLAIMS = (
    ("WS + GN matches BN (within ±margin)", "ws_gn", "bn", "equivalent"),
    ("WN makes no difference vs plain (within ±margin)", "wn", "plain", "equivalent"),
    ("scaled WS beats plain", "sws", "plain", "less"),
    ("scaled WS beats BN", "sws", "bn", "less"),
    ("BN beats plain", "bn", "plain", "less"),
    ("WS alone, at its own lr, trails plain", "ws", "plain", "greater"),
)


def claims(record: Mapping[str, Any], margin: float | None = None) -> list[tuple[str, Interval, str]]:
    """`(claim, Interval, verdict)` rows for `normlab.stats.verdict_table`: each of `CLAIMS` whose two
    variants have final runs, the difference paired by seed, the verdict by `normlab.stats.seed_verdict`
    (equivalence claims with `margin` points, default the config's): "not tested here" below
    `stats.MIN_SEEDS` shared seeds, with no interval below 2."""
    config = _config(record)
    margin = config["margin"] if margin is None else margin
    have = {v for v in config["variants"] if _phase(record, "final", v)}
    rows = []
    for text, v, ref, direction in CLAIMS:
        if {v, ref} <= have:
            text = text.replace("margin", f"{margin:g}")
            if len(set(_finals(record, v)) & set(_finals(record, ref))) < 2:
                rows.append((text, None, NOT_TESTED))
                continue
            iv = difference(record, v, ref)
            rows.append((text, iv, seed_verdict(iv, direction=direction,
                                                margin=margin if direction == "equivalent" else None)))
    return rows


def trains_at_any_lr(record: Mapping[str, Any], variant: str = "ws", below: float | None = None) -> dict[str, Any]:
    """Does `variant` train at some lr of its sweep? `{"trains", "lrs" (those whose median validation error
    is below `below` percent, default the config's `trains_below`; chance is 90), "best_lr",
    "best_val_error", "grid" ([smallest, largest] lr tried), "verdict"}` (`holds` / `does not hold`)."""
    below = _config(record)["trains_below"] if below is None else below
    runs_v = _phase(record, "sweep", variant)
    if not runs_v:
        raise ValueError(f"the record has no sweep runs of {variant!r}: record the sweep first")
    table = lr_table(runs_v)
    ok = [row for row in table if row["val_error"] is not None and row["val_error"] < below]
    best = min(ok, key=lambda row: row["val_error"], default=None)
    grid = sorted(row["lr"] for row in table)
    return {"trains": bool(ok), "lrs": [row["lr"] for row in ok], "best_lr": best and best["lr"],
            "best_val_error": best and best["val_error"], "grid": [grid[0], grid[-1]],
            "verdict": HOLDS if ok else DOES_NOT_HOLD}


def _finished(record: Mapping[str, Any], variant: str, metric: str) -> list[dict[str, Any]]:
    """The final runs of `variant` that did not diverge and have `metric` at the last epoch."""
    return finished(_phase(record, "final", variant), metric, _config(record)["epochs"])


def flatness(record: Mapping[str, Any], fraction: float = 0.2, metric: str = "test_error",
             tol: float = 0.25) -> dict[str, dict[str, Any]]:
    """How much `metric` still moved over the last `fraction` of training, per variant's final runs
    (`normlab.selection.tail_change`): `{variant: {"from_epoch", "to_epoch", "change" (mean over seeds of
    end minus start, points), "max_abs_change", "n", "flat" (max_abs_change <= tol points)}}`. Diverged
    and unfinished runs are left out."""
    epochs = _config(record)["epochs"]
    out = {}
    for v in _config(record)["variants"]:
        changes, start = [], None
        for r in _finished(record, v, metric):
            start, change = selection.tail_change(r["history"], metric, fraction, "epoch", end=epochs)
            changes.append(change)
        if changes:
            worst = max(abs(c) for c in changes)
            out[v] = {"from_epoch": start, "to_epoch": epochs, "change": statistics.mean(changes),
                      "max_abs_change": worst, "n": len(changes), "flat": worst <= tol}
    return out


def curves(record: Mapping[str, Any], metric: str = "test_error") -> dict[str, dict[str, Any]]:
    """`metric` by epoch of each variant's final runs: `{variant: {"epoch", "mean", "min", "max" (lists, one
    value per epoch, over seeds), "n" (seeds)}}`. Diverged and unfinished runs are left out (as in
    `flatness`), and so are variants without a finished final run."""
    out = {}
    for v in _config(record)["variants"]:
        curve = band(_finished(record, v, metric), metric)
        if curve is not None:
            out[v] = curve
    return out


#: How the chapter names the variants in tables, figures and `findings`.
LABELS = {"plain": "plain", "wn": "WN", "ws": "WS", "sws": "scaled WS", "ws_gn": "WS + GN", "bn": "BN"}


def findings(record: Mapping[str, Any], margin: float | None = None, fraction: float = 0.2,
             tol: float = 0.25) -> list[str]:
    """The chapter's results as sentences, every number and verdict read from `record` by the readers
    above: the chosen lrs (and any at the end of its grid), the mean test errors ranked, each of `claims`
    with its verdict, whether WS alone trains at some lr (`trains_at_any_lr`), and whether the test error
    had stopped moving over the last `fraction` of training (`flatness`, `tol` points). Parts whose runs
    are not recorded yet are left out."""
    config = _config(record)
    lines = []
    chosen = chosen_lrs(record)
    if chosen:
        edges = [f"{LABELS[v]} ({c['at_edge']} end)" for v, c in chosen.items() if c["at_edge"]]
        lines.append("Chosen lr: " + ", ".join(f"{LABELS[v]} {c['lr']:g}" for v, c in chosen.items()) + "; "
                     + (f"at the end of its grid: {', '.join(edges)}." if edges else "every one inside its grid."))
    errors = {v: e for v, e in test_errors(record).items() if e["mean"] is not None}
    if errors:
        ranked = sorted(errors, key=lambda v: errors[v]["mean"])
        lines.append("Mean test error over seeds, lowest first: "
                     + ", ".join(f"{LABELS[v]} {errors[v]['mean']:.2f}% (n={errors[v]['n']})" for v in ranked) + ".")
    for text, iv, word in claims(record, margin):
        lines.append(f"{text}: {word} " + (f"(difference {iv.format(2)} points of test error, n={iv.n})." if iv else
                                             "(fewer than 2 shared seeds recorded so far)."))
    if "ws" in config["variants"] and _phase(record, "sweep", "ws"):
        t = trains_at_any_lr(record, "ws")
        grid = f"lr {t['grid'][0]:g} to {t['grid'][1]:g}"
        lines.append(f"WS alone trains (median validation error below {config['trains_below']:g}%) at some lr of "
                     f"its grid ({grid}): {t['verdict']}" + (f"; at {', '.join(f'{lr:g}' for lr in t['lrs'])}, best "
                     f"{t['best_lr']:g} with {t['best_val_error']:.2f}% validation error." if t["trains"] else "."))
    flat = flatness(record, fraction, tol=tol)
    if flat:
        moving = [f"{LABELS[v]} ({f['max_abs_change']:.2f})" for v, f in flat.items() if not f["flat"]]
        span = f"epochs {min(f['from_epoch'] for f in flat.values())} to {config['epochs']}"
        lines.append(f"Over the last {fraction:.0%} of training ({span}) the test error of "
                     + (f"every seed moved by at most {tol:g} points." if not moving else
                        f"some seed moved by more than {tol:g} points: {', '.join(moving)}."))
    return lines
