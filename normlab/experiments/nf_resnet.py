"""Normalizer-free ResNets vs BatchNorm and no normalization: signal propagation at init, training with/without AGC.

Two kinds of runs, after Brock, De & Smith (2021, NF-ResNets) and Brock et al. (2021, NFNets):

- `kind="spp"`: signal propagation plots at initialization, on a batch of real images, for deep
  pre-activation ResNets with BatchNorm (`bn`), without normalization (`none`), and NF-ResNets with
  (`nf`) and without (`nf_nows`) scaled weight standardization. History: one row per block with the
  average channel squared mean, the average channel variance and the residual branch variance.
- `kind="train"`: SGD training of the book's ResNet with BatchNorm (`bn`) and without normalization
  (`none`), and of its NF variant with adaptive gradient clipping (`nf`) and without (`nf_noagc`),
  each at the learning rates listed in the profile. A run whose loss or gradients become NaN/inf stops
  there and is recorded with `metrics.diverged = True`; so is a run whose epoch-mean training loss
  exceeds 10 ln(classes) (exploded without overflowing).

- `kind="sweep"` and `kind="final"` (profiles with `lrs`: `cpu_converged`, and `smoke_converged`, its
  code path in seconds): the same four networks, each at its own best learning rate. A held-out
  validation split of the training images (`val_size`, drawn once with `split_seed`) chooses it: every
  lr of `lrs[model]` is trained once per `sweep_seeds` seed, and the lr with the lowest final
  validation error among the runs that did not diverge (`normlab.selection.choose_lr`) is the one the
  `final` runs train at, once per `final_seeds` seed (seeds the sweep did not use, so the reported test
  errors played no part in the choice). A final run needs its model's sweep in the record: `run_one`
  takes `record` and raises `NotReady` until it is there.
- `kind="budget"` (profiles with `budget`: {"epochs", "seeds"}): every network again at its chosen lr,
  for `budget["epochs"]` (more) epochs, at final seeds: the check that the final runs' budget has
  converged for what the verdicts compare (`budget_gain`, `budget_shift`). A cosine schedule anneals
  the lr to zero at the end of any budget, so a curve flattening there says little; training twice as
  long with the same schedule does.
  Readers: `lr_sweep`, `chosen_lrs`, `final_errors`, `paired_vs_bn`, `agc_clipping`, `divergence`,
  `flatness`, `curves`, `claims` (the chapter's verdicts, `CLAIMS` and `MATCH_MARGIN`), `budget_gain`,
  `budget_shift`, `kind_epochs` (the epochs of final or budget runs), `findings`;
  `spp_summary` reads the signal propagation runs of any profile.

CIFAR-10 by default; `dataset: "fashion_mnist"` in a profile switches to Fashion-MNIST.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import torch
from torch import nn

from . import NotReady
from .. import selection
from ..results import band, finished
from ..nf import NFResNet, PreActResNet, agc_hook, agc_parameters, signal_propagation
from ..tasks import ImageClassification, channel_stats
from ..train import Trainer, TrainConfig
from ..utils import seed_all

_COMMON = {"dataset": "cifar10", "alpha": 0.2, "agc_clip": 0.01, "agc_eps": 1e-3, "momentum": 0.9,
           "nesterov": True, "weight_decay": 5e-4, "warmup_epochs": 0.0, "schedule": "cosine"}

# Each network at its own best lr, trained until the test error barely moves. ResNet-20 on all 50k
# CIFAR-10 training images less a 5k validation split, at 16 px (as gn_batch_size's cpu_converged),
# the full 10k test set, 30 epochs with a 1-epoch warmup and cosine decay. One sweep seed per lr (a
# factor-3 grid: neighbours differ by more than seed noise except near the optimum, where either
# choice is as good), then 3 fresh seeds at the chosen lr. bf16 + channels_last for every network:
# FASTEST lists BN only, so "auto" would train BN in bf16 and the NF / unnormalized nets in fp32 (a
# precision confound, and 1.9x slower for NF); torch's fused BatchNorm (same formula, 3x faster than
# normlab's on a CPU). Cost, measured through run_one at one thread on a shared, loaded 2-core machine
# (pessimistic): 99 / 107 / 102 / 72 ms per step (bn / nf / nf_noagc / none), 2.3 s per evaluation of
# 15k images: 19-20 min per run (14 for none), 30 runs, <= 9 CPU-hours (less for runs that diverge early).
_CONVERGED = {**_COMMON, "depth": 20, "width": 16, "train_size": None, "test_size": None, "batch_size": 128,
              "epochs": 30, "eval_every": 1, "warmup_epochs": 1.0, "spp_depth": 110, "spp_batch": 64,
              "spp_models": ["bn", "none", "nf", "nf_nows"], "spp_seeds": [0, 1, 2], "train": [], "seeds": [0],
              # nf's grid began at 0.1; its sweep put the best there (30.4% validation error, 32.1 at 0.3),
              # at the grid's end, so it was widened by one factor-3 step before any final was recorded; the
              # unnormalized net's began at 0.003 and ended at 0.1, where its sweep put the best (22.8%; 25.0
              # at 0.03), so it was widened to 0.3 the same way before its finals
              "lrs": {"bn": [0.03, 0.1, 0.3, 1.0], "nf": [0.03, 0.1, 0.3, 1.0, 3.0],
                      "nf_noagc": [0.01, 0.03, 0.1, 0.3], "none": [0.003, 0.01, 0.03, 0.1, 0.3]},
              "sweep_seeds": [0], "final_seeds": [1, 2, 3], "val_size": 5000, "split_seed": 2021,
              "image_size": 16, "padding": 2, "precision": "bf16", "memory_format": "channels_last",
              "bn_impl": "fused",
              # the budget check: twice the epochs (same warmup, cosine over all of them) at the final seeds,
              # ~28 min a run (20 for none), 12 runs, ~5.5 CPU-hours
              "budget": {"epochs": 60, "seeds": [1, 2, 3]}}

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: proves the code path of the fixed-lr profiles (cpu, full) with tiny models and a few
    # steps; numbers are not results
    "smoke": {**_COMMON, "depth": 8, "width": 8, "train_size": 256, "test_size": 256, "batch_size": 64,
              "epochs": 2, "spp_depth": 8, "spp_batch": 8, "spp_models": ["bn", "none", "nf", "nf_nows"],
              "train": [["bn", 0.1], ["none", 0.1], ["nf", 0.8], ["nf_noagc", 0.8]], "seeds": [0]},
    # a reduced reproduction for one shared CPU core: ResNet-20 on a 5,000-image CIFAR-10 subset
    "cpu": {**_COMMON, "depth": 20, "width": 16, "train_size": 5000, "test_size": 2000, "batch_size": 128,
            "epochs": 4, "spp_depth": 110, "spp_batch": 64, "spp_models": ["bn", "none", "nf", "nf_nows"],
            "train": [["bn", 0.1], ["nf", 0.8], ["nf_noagc", 0.8], ["none", 0.1], ["nf_noagc", 0.1], ["bn", 0.8]],
            "seeds": [0, 1]},
    # for a GPU (sized for <= 15 min on one H100; not measured): the full training set, the paper's 600-layer depth for the
    # signal propagation plots
    "full": {**_COMMON, "depth": 20, "width": 16, "train_size": 50000, "test_size": 10000, "batch_size": 128,
             "epochs": 15, "spp_depth": 602, "spp_batch": 256, "spp_models": ["bn", "none", "nf", "nf_nows"],
             "train": [["bn", 0.1], ["bn", 0.8], ["nf", 0.8], ["nf_noagc", 0.8], ["none", 0.1], ["none", 0.01],
                       ["nf_noagc", 0.1], ["nf", 0.1]],
             "seeds": [0]},
    "cpu_converged": _CONVERGED,
    # seconds: cpu_converged's code path (spp runs, a 2-lr sweep per network on a validation split, 2
    # final seeds at the chosen lr) with tiny models on a few hundred 16-px images; numbers are not results
    "smoke_converged": {**_CONVERGED, "depth": 8, "width": 8, "train_size": 256, "test_size": 256, "val_size": 64,
                        "batch_size": 64, "epochs": 2, "spp_depth": 8, "spp_batch": 8,
                        "lrs": {"bn": [0.03, 0.1], "nf": [0.1, 0.3], "nf_noagc": [0.03, 0.1], "none": [0.01, 0.03]},
                        "final_seeds": [1, 2], "budget": {"epochs": 3, "seeds": [1, 2]}},
}

SPP_MODELS = ("bn", "none", "nf", "nf_nows")
TRAIN_MODELS = ("bn", "none", "nf", "nf_noagc")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Signal propagation runs first (cheap; seed by seed over `spp_seeds`, by default the first of `seeds`), then the fixed-lr training runs, seed by
    seed; then the lr sweep network by network (a network's final runs need only its own sweep), then
    the final runs seed by seed (a partial record then already pairs the networks), then the budget
    check seed by seed."""
    out: list[dict[str, Any]] = []
    # signal propagation at init: a few seconds a run, so a verdict on it can rest on several draws of
    # the weights and the image batch (the seed sets both)
    out += [{"kind": "spp", "model": m, "seed": seed} for seed in config.get("spp_seeds", config["seeds"][:1])
            for m in config["spp_models"]]
    for seed in config["seeds"]:
        out += [{"kind": "train", "model": m, "lr": lr, "seed": seed} for m, lr in config["train"]]
    lrs = _check_lrs(config)
    out += [{"kind": "sweep", "model": m, "lr": lr, "seed": seed}
            for m, grid in lrs.items() for lr in grid for seed in config["sweep_seeds"]]
    out += [{"kind": "final", "model": m, "seed": seed} for seed in config.get("final_seeds", []) for m in lrs]
    out += [{"kind": "budget", "model": m, "seed": seed} for seed in _check_budget(config, lrs) for m in lrs]
    for r in out:
        allowed = SPP_MODELS if r["kind"] == "spp" else TRAIN_MODELS
        if r["model"] not in allowed:
            raise ValueError(f"unknown {r['kind']} model {r['model']!r}; choose from {allowed}")
    return out


def _check_lrs(config: dict[str, Any]) -> dict[str, list[float]]:
    """The profile's `lrs` ({model: grid}, empty without one), after checking what the sweep needs."""
    lrs = config.get("lrs") or {}
    if not lrs:
        return {}
    fix = "fix the profile in normlab/experiments/nf_resnet.py"
    for m, grid in lrs.items():
        if m not in TRAIN_MODELS:
            raise ValueError(f"unknown lrs model {m!r}; choose from {TRAIN_MODELS} ({fix})")
        if not grid or not all(isinstance(lr, (int, float)) and lr > 0 for lr in grid) or len(set(grid)) < len(grid):
            raise ValueError(f"lrs[{m!r}] must be a non-empty list of distinct learning rates > 0, got {grid!r} ({fix})")
    sweep_seeds, final_seeds = config.get("sweep_seeds") or [], config.get("final_seeds") or []
    if not sweep_seeds:
        raise ValueError(f"a profile with lrs needs sweep_seeds (e.g. [0]) to run its lr sweep ({fix})")
    if len(final_seeds) < 2:
        raise ValueError(f"final_seeds needs at least 2 seeds for paired intervals (the book's standard is 3), "
                         f"got {final_seeds!r} ({fix})")
    if set(sweep_seeds) & set(final_seeds):
        raise ValueError(f"final_seeds {final_seeds} repeat sweep_seeds {sweep_seeds}: a final run with a sweep seed "
                         f"repeats that sweep run, and its test error took part in choosing the lr ({fix})")
    if not config.get("val_size"):
        raise ValueError(f"a profile with lrs chooses them on a validation split: set val_size (e.g. 5000) ({fix})")
    return lrs


def _check_budget(config: dict[str, Any], lrs: dict[str, list[float]]) -> list[int]:
    """The budget check's seeds (empty without one), after checking that it can pair with the finals."""
    budget = config.get("budget")
    if not budget:
        return []
    fix = "fix the profile in normlab/experiments/nf_resnet.py"
    if not lrs:
        raise ValueError(f"a budget check reruns the final runs for longer: it needs lrs and final_seeds ({fix})")
    if set(budget) != {"epochs", "seeds"}:
        raise ValueError(f"budget must be {{'epochs': E, 'seeds': [...]}}, got keys {sorted(budget)} ({fix})")
    if not isinstance(budget["epochs"], int) or budget["epochs"] <= config["epochs"]:
        raise ValueError(f"budget epochs must be an integer above the final runs' {config['epochs']} "
                         f"(e.g. {2 * config['epochs']}), got {budget['epochs']!r} ({fix})")
    seeds = list(budget["seeds"])
    extra = sorted(set(seeds) - set(config["final_seeds"]))
    if len(seeds) < 2 or extra:
        raise ValueError(f"budget seeds must be at least 2 of final_seeds {config['final_seeds']} (each pairs "
                         f"with its final run), got {seeds!r} ({fix})")
    return seeds


@functools.lru_cache(maxsize=2)
def _dataset(name: str):
    from .. import data

    return data.load(name)


def _split(config: dict[str, Any], seed: int):
    """A seeded training subset and a fixed test subset (the same for every run and seed)."""
    from .. import data

    d = data.subset(_dataset(config["dataset"]), config["train_size"], config["test_size"], seed, test_seed=12345)
    return d.train_images, d.train_labels, d.test_images, d.test_labels


def build_model(kind: str, model: str, config: dict[str, Any], in_channels: int, depth: int | None = None) -> nn.Module:
    """The network of a run (initialized from the global RNG, which the caller seeds)."""
    from ..models.resnet import CIFARResNet

    depth = depth or config["depth"]
    width = config["width"]
    if model in ("nf", "nf_noagc", "nf_nows"):
        return NFResNet(depth=depth, width=width, in_channels=in_channels, alpha=config["alpha"], ws=model != "nf_nows")
    norm = "bn" if model == "bn" else None
    if norm == "bn" and kind == "train" and config.get("bn_impl", "normlab") != "normlab":
        if config["bn_impl"] != "fused":
            raise ValueError(f"bn_impl must be 'normlab' (normlab's BatchNorm2d) or 'fused' (torch's), "
                             f"got {config['bn_impl']!r}")
        norm = nn.BatchNorm2d
    if kind == "spp":  # the paper's plots are of pre-activation ResNets with projection shortcuts
        return PreActResNet(depth=depth, width=width, in_channels=in_channels, norm_layer=norm)
    return CIFARResNet(depth=depth, width=width, in_channels=in_channels, norm_layer=norm)


def _run_spp(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    gen = seed_all(run["seed"])
    x_train, _, x_test, _ = _split(config, run["seed"])
    mean, std = channel_stats(x_train)
    idx = torch.randperm(len(x_test), generator=gen)[: config["spp_batch"]]
    x = ((x_test[idx].float() - mean) / std).to(device)
    model = build_model("spp", run["model"], config, x.shape[1], depth=config["spp_depth"]).to(device).train()
    stats = signal_propagation(model, x)
    # very deep unnormalized nets overflow float32: JSON has no inf/NaN, so those become null
    history = [{"block": i + 1, **{k: _finite(v[i]) for k, v in stats.items()}} for i in range(len(stats["avg_var"]))]
    return {"metrics": {"blocks": len(history), "final_avg_var": _finite(stats["avg_var"][-1]),
                        "final_avg_sq_mean": _finite(stats["avg_sq_mean"][-1]),
                        "max_avg_var": _finite(max(stats["avg_var"])),
                        "mean_res_var": _finite(sum(stats["res_var"]) / len(history))},
            "history": history}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _run_train(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool,
               checkpoint=None, lr: float | None = None) -> dict[str, Any]:
    """Train one network (`kind` "train" at `run["lr"]`; "sweep" and "final" at `lr`, on the split
    with a validation set) and return its metrics and per-epoch history."""
    lr = run["lr"] if lr is None else lr
    seed_all(run["seed"])
    if run["kind"] == "train":
        x_train, y_train, x_test, y_test = _split(config, run["seed"])
        val: dict[str, torch.Tensor] = {}
        source = _dataset(config["dataset"]).source
    else:
        x_train, y_train, x_val, y_val, x_test, y_test, source = _val_split(config)
        val = {"val_images": x_val, "val_labels": y_val}
    model = build_model("train", run["model"], config, x_train.shape[1]).to(device)
    # the defaults are those of the profiles that predate the settings (fp32, NCHW, pad 4, every epoch)
    tc = TrainConfig(epochs=config["epochs"], batch_size=config["batch_size"], lr=lr,
                     momentum=config["momentum"], nesterov=config["nesterov"],
                     weight_decay=config["weight_decay"], schedule=config["schedule"],
                     warmup=config["warmup_epochs"], seed=run["seed"], eval_every=config.get("eval_every", 1),
                     precision=config.get("precision", "fp32"), memory_format=config.get("memory_format", "contiguous"))
    hooks = [agc_hook(agc_parameters(model), clip=config["agc_clip"], eps=config["agc_eps"])] \
        if run["model"] == "nf" else []
    task = ImageClassification(x_train, y_train, x_test, y_test, padding=config.get("padding", 4), **val)
    trainer = Trainer(model, task, tc, hooks=hooks, checkpoint=checkpoint, device=device)
    history = trainer.fit(progress=progress, desc=f"{run['model']} lr={lr}")
    exploded = 10 * math.log(int(y_train.max()) + 1)  # 10x the loss of a uniform guess
    blown = next((r["step"] for r in history if r.get("train_loss") is not None and not r["train_loss"] < exploded), None)
    metrics = {**trainer.summary(), "epochs_done": len(history), "n_train": len(x_train), "n_test": len(x_test),
               "data_source": source}
    if val:
        metrics.update(val_error=history[-1].get("val_error"), n_val=len(y_val), lr=lr, precision=tc.precision,
                       memory_format=tc.memory_format)
    metrics["diverged"] = trainer.diverged or blown is not None
    metrics["diverged_step"] = history[-1]["step"] if trainer.diverged else blown
    metrics.update(clip_summary(history))
    return {"metrics": metrics, "history": history}


def clip_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """AGC's clipped fraction of units from a run's history: `agc_clip_fraction`, the mean over every
    training step (rows weighted by their steps: a row cut short by divergence counts for its steps),
    and `agc_clip_fraction_last`, the last row's (the last epoch's) mean. Empty for runs without AGC."""
    total = steps = 0.0
    last, prev = None, 0
    for row in history:
        n, prev = row["step"] - prev, row["step"]
        if row.get("agc_clip_fraction") is not None:
            total, steps, last = total + row["agc_clip_fraction"] * n, steps + n, row["agc_clip_fraction"]
    return {"agc_clip_fraction": total / steps, "agc_clip_fraction_last": last} if steps else {}


_VAL_CACHE: dict[tuple, tuple] = {}


def _val_split(config: dict[str, Any]):
    """(train_x, train_y, val_x, val_y, test_x, test_y, source) at `image_size`: `val_size` training
    images held out by `normlab.data.holdout` with `split_seed` (the same for every network, lr and
    seed), the next `train_size` (None: all the rest) to train on, and `test_size` test images (None: all)."""
    from .. import data

    key = tuple(config.get(k) for k in ("dataset", "image_size", "val_size", "split_seed", "train_size", "test_size"))
    if key not in _VAL_CACHE:
        full = _dataset(config["dataset"])
        split = data.resize(full, config["image_size"]) if config.get("image_size") else full
        split = data.subset(split, None, config.get("test_size"), seed=0, test_seed=12345)
        try:
            train, val_x, val_y = data.holdout(split, config["val_size"], config["split_seed"],
                                               config.get("train_size"), names=("val_size", "train_size"))
        except ValueError as e:
            raise ValueError(f"{e} (fix the profile in normlab/experiments/nf_resnet.py)") from None
        _VAL_CACHE.clear()
        _VAL_CACHE[key] = (train.train_images, train.train_labels, val_x, val_y, train.test_images,
                           train.test_labels, split.source)
    return _VAL_CACHE[key]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run. A `final` run trains at the lr its model's sweep in `record` chose (`normlab.sweep`
    passes the record; it raises `NotReady` while that sweep is incomplete)."""
    device = torch.device(device)
    if run["kind"] == "spp":
        return _run_spp(run, config, device)
    if run["kind"] in ("train", "sweep"):
        return _run_train(run, config, device, progress, checkpoint)
    if run["kind"] in ("final", "budget"):
        if record is None:
            raise ValueError(f"a {run['kind']} run trains at the lr its sweep chose: pass record= (the record holding "
                             "the sweep; `python -m normlab run nf_resnet --profile P` does)")
        lr = _lr_for(run["model"], config, record)
        if run["kind"] == "budget":
            _check_budget(config, _check_lrs(config))
            config = {**config, "epochs": config["budget"]["epochs"]}
        return _run_train(run, config, device, progress, checkpoint, lr=lr)
    raise ValueError(f"run kind must be 'spp', 'train', 'sweep', 'final' or 'budget', got {run['kind']!r}")


# ----------------------------------------------------------------------------------------------------
# choosing the learning rate, and reading the record (used by the chapter)
# ----------------------------------------------------------------------------------------------------


def _sweep_errors(record: dict[str, Any], model: str) -> dict[float, list[float | None]]:
    """{lr: final validation errors of `model`'s sweep runs at it, None where a run diverged}."""
    return selection.sweep_scores([r for r in record["runs"]
                                   if r["config"].get("kind") == "sweep" and r["config"]["model"] == model])


def _lr_for(model: str, config: dict[str, Any], record: dict[str, Any]) -> float:
    """The lr a final run of `model` trains at; `NotReady` until the model's whole sweep is recorded."""
    grid = _check_lrs(config).get(model)
    if grid is None:
        raise ValueError(f"the profile has no lrs for {model!r}: add them, or drop its final runs")
    errors = _sweep_errors(record, model)
    need = len(config["sweep_seeds"])
    missing = [lr for lr in grid if len(errors.get(lr, [])) < need]
    if missing:
        raise NotReady(f"{model}'s lr sweep lacks lr {missing} ({need} seed(s) each)")
    try:
        return selection.choose_lr({lr: errors[lr] for lr in grid})
    except ValueError as e:
        raise ValueError(f"{model}: {e} (PROFILES[...]['lrs'][{model!r}] in normlab/experiments/nf_resnet.py)") from None


#: The networks of the lr-sweep comparison, in the order readers return them, and their names.
ARMS = ("bn", "nf", "nf_noagc", "none")
ARM_NAMES = {"bn": "BN", "nf": "NF + AGC", "nf_noagc": "NF, no AGC", "none": "no norm"}


def _arms(record: dict[str, Any]) -> list[str]:
    """The networks of the record's lr sweep; an error naming the fix for a record without one."""
    lrs = record.get("config", {}).get("lrs")
    if not lrs:
        raise ValueError(f"the {record.get('profile')!r} record of nf_resnet has no lr sweep (its config has no lrs); "
                         "these readers need a profile with one, e.g. results.load('nf_resnet', 'cpu_converged')")
    return [a for a in ARMS if a in lrs]


def _finals(record: dict[str, Any], model: str, kind: str = "final") -> list[dict[str, Any]]:
    """`model`'s final runs (`kind="budget"`: its budget-check runs)."""
    if kind not in ("final", "budget"):
        raise ValueError(f"kind must be 'final' (the final runs) or 'budget' (the budget check), got {kind!r}")
    return [r for r in record["runs"] if r["config"].get("kind") == kind and r["config"]["model"] == model]


def kind_epochs(record: dict[str, Any], kind: str) -> int:
    """The epochs that `kind`'s runs train ("final": the profile's `epochs`; "budget": the budget check's)."""
    return record["config"]["budget"]["epochs"] if kind == "budget" else record["config"]["epochs"]


def lr_sweep(record: dict[str, Any]) -> dict[str, dict[float, float | None]]:
    """`{model: {lr: final validation error (%)}}` of the sweep, the median over sweep seeds
    (`normlab.selection.lr_table`); `None` where a run diverged, `nan` where the lr is not recorded yet."""
    out = {}
    for arm in _arms(record):
        errors = _sweep_errors(record, arm)
        rows = {row["lr"]: row["score"] for row in selection.lr_table({lr: v for lr, v in errors.items() if v})}
        out[arm] = {lr: rows.get(lr, math.nan) for lr in record["config"]["lrs"][arm]}
    return out


def chosen_lrs(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{model: {"lr", "val_error", "at_edge"}}`: the lr `normlab.selection.choose_lr` picks from the sweep (the one the
    final runs trained at; a final run recorded at another lr is an error), its validation error, and
    whether it is the grid's smallest or largest lr (then the grid may not bracket the best one).
    Models whose sweep is incomplete are left out."""
    out = {}
    for arm in _arms(record):
        grid = record["config"]["lrs"][arm]
        errors = _sweep_errors(record, arm)
        if any(len(errors.get(lr, [])) < len(record["config"]["sweep_seeds"]) for lr in grid):
            continue
        lr = selection.choose_lr({g: errors[g] for g in grid})
        for kind in ("final", "budget"):
            used = {r["metrics"].get("lr") for r in _finals(record, arm, kind)} - {lr}
            if used:
                raise ValueError(f"{arm}'s {kind} runs trained at lr {sorted(used)}, but its recorded sweep chooses "
                                 f"{lr}: the sweep changed after they ran; delete the {kind} runs and record them again")
        out[arm] = {"lr": lr, "val_error": statistics.median(errors[lr]), "at_edge": selection.edge(lr, grid)}
    return out


def final_errors(record: dict[str, Any], metric: str = "test_error", kind: str = "final") -> dict[str, dict[str, Any]]:
    """`{model: {"lr", "seeds": {seed: value}, "mean", "sd", "min", "max", "n", "diverged"}}` of `metric`
    over the final runs (`kind="budget"`: the budget check's) (diverged runs included, at the error they
    stopped with; `diverged` counts them). `sd` is the sample standard deviation over seeds (None for one seed)."""
    out = {}
    for arm in _arms(record):
        finals = _finals(record, arm, kind)
        if not finals:
            continue
        seeds = {r["seed"]: r["metrics"][metric] for r in finals}
        v = list(seeds.values())
        out[arm] = {"lr": finals[0]["metrics"].get("lr"), "seeds": seeds, "mean": statistics.fmean(v),
                    "sd": statistics.stdev(v) if len(v) > 1 else None, "min": min(v), "max": max(v), "n": len(v),
                    "diverged": sum(bool(r["metrics"].get("diverged")) for r in finals)}
    return out


def paired_vs_bn(record: dict[str, Any], metric: str = "test_error", confidence: float = 0.95):
    """`{model: normlab.stats.Interval}` of `metric`(model) - `metric`(BN), paired by seed over the final
    runs (negative: the model beats BN), for every model with final runs besides BN."""
    from ..stats import paired_difference

    errs = final_errors(record, metric)
    if "bn" not in errs:
        raise ValueError("no final BN runs in this record: the paired differences are against BN")
    return {arm: paired_difference(e["seeds"], errs["bn"]["seeds"], confidence=confidence)
            for arm, e in errs.items() if arm != "bn"}


def agc_clipping(record: dict[str, Any]) -> dict[str, Any]:
    """AGC's fraction of clipped units in the NF + AGC runs: `{"sweep": {lr: {"mean", "last"}}, "final":
    {seed: {"mean", "last"}}}`, `mean` over all training steps, `last` over the last epoch (`clip_summary`)."""
    if "nf" not in _arms(record):
        raise ValueError("this record's sweep has no NF + AGC runs (model 'nf')")
    pick = lambda m: {"mean": m.get("agc_clip_fraction"), "last": m.get("agc_clip_fraction_last")}  # noqa: E731
    sweep = {r["config"]["lr"]: pick(r["metrics"]) for r in record["runs"]
             if r["config"].get("kind") == "sweep" and r["config"]["model"] == "nf"}
    return {"sweep": dict(sorted(sweep.items())),  # by lr, not by when a widened grid's run was added
            "final": {r["seed"]: pick(r["metrics"]) for r in sorted(_finals(record, "nf"), key=lambda r: r["seed"])}}


def divergence(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """`{model: [{"kind", "lr", "seed", "step"}, ...]}`: the sweep, final and budget runs that diverged (loss
    NaN/inf, or above 10 ln(classes)), and at which step; an empty list for a model none of whose did."""
    out: dict[str, list[dict[str, Any]]] = {arm: [] for arm in _arms(record)}
    for r in record["runs"]:
        c, m = r["config"], r["metrics"]
        if c.get("kind") in ("sweep", "final", "budget") and c["model"] in out and m.get("diverged"):
            out[c["model"]].append({"kind": c["kind"], "lr": c.get("lr", m.get("lr")), "seed": r["seed"],
                                    "step": m.get("diverged_step")})
    return out


def flatness(record: dict[str, Any], fraction: float = 0.2, metric: str = "test_error",
             kind: str = "final") -> dict[str, dict[str, Any]]:
    """How much `metric` still moved over the last `fraction` of training, per model's final runs
    (`kind="budget"`: the budget check's):
    `{model: {"from_epoch", "to_epoch", "seeds": {seed: change}, "mean", "max_abs"}}`, change = value at
    the end - value at the last evaluation at or before (1 - fraction) of the epochs
    (`normlab.selection.tail_change`; negative: still improving). Diverged runs are left out
    (`divergence` lists them)."""
    epochs = kind_epochs(record, kind)
    out = {}
    for arm in _arms(record):
        seeds, span = {}, None
        for r in _finals(record, arm, kind):
            if r["metrics"].get("diverged"):
                continue
            start, seeds[r["seed"]] = selection.tail_change(r["history"], metric, fraction, "epoch", end=epochs)
            span = (start, epochs)
        if seeds:
            v = list(seeds.values())
            out[arm] = {"from_epoch": span[0], "to_epoch": span[1], "seeds": seeds, "mean": sum(v) / len(v),
                        "max_abs": max(abs(x) for x in v)}
    return out


def curves(record: dict[str, Any], metric: str = "test_error", kind: str = "final") -> dict[str, dict[str, Any]]:
    """`metric` by epoch over each model's final runs (`kind="budget"`: the budget check's): `{model:
    {"epoch", "mean", "min", "max" (one value
    per epoch, over seeds), "n" (seeds)}}`. Diverged runs are left out (as in `flatness`; `divergence`
    lists them), and so are runs without `metric` at every epoch (unfinished, or a larger eval_every)."""
    epochs = kind_epochs(record, kind)
    out = {}
    for arm in _arms(record):
        curve = band(finished(_finals(record, arm, kind), metric, epochs), metric)
        if curve is not None:
            out[arm] = curve
    return out


#: An NF-ResNet "matches" BN when the whole interval of their paired difference in final test error lies
#: within this many points either side of zero. Fixed before the record: a point is expected to be a
#: few times the seed-to-seed spread of a CIFAR ResNet-20's test error, and wide enough that the
#: interval of three seeds can fall inside it.
MATCH_MARGIN = 1.0

#: The chapter's claims: (text, model, reference, direction of `normlab.stats.verdict`). The estimate
#: is test error(model) - test error(reference) in points, paired by final seed: "less" means the
#: model has the lower error.
CLAIMS = (
    ("NF + AGC matches BN (within ±{margin:g})", "nf", "bn", "equivalent"),
    ("NF without AGC trails NF + AGC", "nf_noagc", "nf", "greater"),
    ("BN beats the unnormalized net", "bn", "none", "less"),
    ("NF + AGC beats the unnormalized net", "nf", "none", "less"),
    # Added after the 30-epoch finals were seen, at the margin fixed before them: the NF-ResNet paper's
    # own networks have no AGC (AGC came with NFNets), so this is its claim as published.
    ("NF without AGC matches BN (within ±{margin:g})", "nf_noagc", "bn", "equivalent"),
)


def claims(record: dict[str, Any], margin: float = MATCH_MARGIN,
           confidence: float = 0.95, kind: str = "final") -> list[tuple[str, Any, str]]:
    """`(claim, normlab.stats.Interval, verdict)` rows for `normlab.stats.verdict_table`, one per claim of
    `CLAIMS` whose two models are in the record's sweep: the paired difference of final test error over
    the final seeds they share (`normlab.stats.paired_difference`), judged by `normlab.stats.seed_verdict`
    (the equivalence claim within `margin` points): "not tested here" below `stats.MIN_SEEDS` shared
    seeds, with no interval below 2. Diverged final runs count at the error they stopped with, and the
    claim then names them, e.g. "[no norm: 1 of 3 final runs diverged]". `kind="budget"`: the same
    claims on the budget check's runs (twice the epochs)."""
    from ..stats import NOT_TESTED, paired_difference, seed_verdict

    finals = {arm: {r["seed"]: r["metrics"] for r in _finals(record, arm, kind)} for arm in _arms(record)}
    rows = []
    for text, model, ref, direction in CLAIMS:
        a, b = finals.get(model, {}), finals.get(ref, {})
        seeds = [s for s in a if s in b]
        if model not in finals or ref not in finals:
            continue
        if len(seeds) < 2:
            rows.append((text.format(margin=margin), None, NOT_TESTED))
            continue
        iv = paired_difference({s: a[s]["test_error"] for s in seeds}, {s: b[s]["test_error"] for s in seeds},
                               confidence=confidence)
        word = seed_verdict(iv, direction=direction, margin=margin if direction == "equivalent" else None)
        notes = [f"{ARM_NAMES[m]}: {n} of {len(seeds)} {kind} runs diverged" for m, runs_m in ((model, a), (ref, b))
                 if (n := sum(bool(runs_m[s].get("diverged")) for s in seeds))]
        rows.append((text.format(margin=margin) + (f" [{'; '.join(notes)}]" if notes else ""), iv, word))
    return rows


def _paired_kinds(record: dict[str, Any], model: str) -> dict[int, tuple[float, float]]:
    """`{seed: (final test error, budget test error)}` of `model` at the seeds with both runs."""
    short = {r["seed"]: r["metrics"]["test_error"] for r in _finals(record, model)}
    long = {r["seed"]: r["metrics"]["test_error"] for r in _finals(record, model, "budget")}
    return {s: (short[s], long[s]) for s in sorted(short) if s in long}


def budget_gain(record: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    """`{model: normlab.stats.Interval}`: final test error with the budget check's epochs minus with the
    final runs', paired by seed (negative: twice the epochs still lowered it). Models with fewer than 2
    seeds with both runs are left out."""
    from ..stats import paired_difference

    out = {}
    for arm in _arms(record):
        pairs = _paired_kinds(record, arm)
        if len(pairs) >= 2:
            out[arm] = paired_difference({s: v[1] for s, v in pairs.items()}, {s: v[0] for s, v in pairs.items()},
                                         confidence=confidence)
    return out


def budget_shift(record: dict[str, Any], margin: float = MATCH_MARGIN,
                 confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Does what the claims compare move with the budget? For each claim of `CLAIMS` (by its text, as
    `claims` names it with `margin`), test error(model) - test error(reference) paired by seed: `"short"` over
    the final runs, `"long"` over the budget check's, and `"change"` = long minus short, the difference of
    the per-seed differences, each a `normlab.stats.Interval` over the seeds where all four runs are
    recorded. Near 0: the extra epochs move both networks alike, so a verdict on the final runs stands
    even where their errors still fall (`budget_gain`). Claims with fewer than 2 such seeds are left out."""
    from ..stats import paired_difference

    out = {}
    for text, model, ref, _ in CLAIMS:
        a, b = _paired_kinds(record, model), _paired_kinds(record, ref)
        seeds = [s for s in a if s in b]
        if len(seeds) < 2:
            continue
        short = {s: a[s][0] - b[s][0] for s in seeds}
        long = {s: a[s][1] - b[s][1] for s in seeds}
        pair = lambda side: ({s: a[s][side] for s in seeds}, {s: b[s][side] for s in seeds})  # noqa: E731
        out[text.format(margin=margin)] = {
            "short": paired_difference(*pair(0), confidence=confidence),
            "long": paired_difference(*pair(1), confidence=confidence),
            "change": paired_difference(long, short, confidence=confidence)}
    return out


#: How the chapter names the signal propagation networks.
SPP_NAMES = {"bn": "BN-ReLU (pre-act)", "none": "no normalization (pre-act)", "nf": "NF-ResNet",
             "nf_nows": "NF-ResNet without scaled WS"}


def spp_summary(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The signal propagation runs in numbers: `{model: {"blocks", "var_first", "var_last" (average channel
    variance after the first and the last block), "sq_mean_last" (average squared channel mean after the
    last block), "mean_shift" (sq_mean_last / var_last), "branch_var" (residual branch variance, mean over
    blocks), "stage_linearity" (the lowest, over the three stages, Pearson correlation of the variance
    with the block index: 1 for the paper's linear growth within a stage; nan for stages of fewer than 3
    blocks), "n_seeds", "range":
    {statistic: (min, max) over seeds}}}`, in the record's order. Each
    statistic is the median over the model's seeds (draws of weights and images); `nan` where a statistic
    overflowed float32 (recorded as null) in any seed, since an overflow is itself the finding."""
    val = lambda x: math.nan if x is None else x  # noqa: E731
    per_seed: dict[str, list[dict[str, float]]] = {}
    for r in record["runs"]:
        if r["config"].get("kind") != "spp":
            continue
        first, last = r["history"][0], r["history"][-1]
        var_last, sq_last = val(last["avg_var"]), val(last["avg_sq_mean"])
        per_seed.setdefault(r["config"]["model"], []).append(
            {"blocks": len(r["history"]), "var_first": val(first["avg_var"]), "var_last": var_last,
             "sq_mean_last": sq_last, "mean_shift": sq_last / var_last if var_last else math.nan,
             "branch_var": val(r["metrics"]["mean_res_var"]),
             "stage_linearity": _stage_linearity([val(h["avg_var"]) for h in r["history"]])})
    out: dict[str, dict[str, Any]] = {}
    for model, rows in per_seed.items():
        stats = {k: [row[k] for row in rows] for k in rows[0]}
        nan = {k: any(math.isnan(v) for v in vs) for k, vs in stats.items()}
        out[model] = {k: math.nan if nan[k] else statistics.median(vs) for k, vs in stats.items()}
        out[model]["n_seeds"] = len(rows)
        out[model]["range"] = {k: (math.nan, math.nan) if nan[k] else (min(vs), max(vs)) for k, vs in stats.items()
                               if k != "blocks"}
    return out


def _stage_linearity(var: list[float], stages: int = 3) -> float:
    """min over the stages of corr(block index, variance): how straight each stage's segment of the
    signal propagation plot is (the CIFAR ResNets have three stages of equal length)."""
    if len(var) % stages:
        raise ValueError(f"{len(var)} blocks do not split into {stages} stages of equal length")
    n = len(var) // stages
    if n < 3 or any(math.isnan(v) for v in var):
        return math.nan
    segs = [var[i * n:(i + 1) * n] for i in range(stages)]
    return min(statistics.correlation(range(n), seg) if len(set(seg)) > 1 else math.nan for seg in segs)


def findings(record: dict[str, Any], margin: float = MATCH_MARGIN, fraction: float = 0.2) -> list[str]:
    """The chapter's results as sentences, every number and verdict read from `record` by the readers
    above: the signal propagation at initialization (`spp_summary`), the chosen lrs and any at the end of
    its grid (`chosen_lrs`), the runs that diverged (`divergence`), the final test errors
    (`final_errors`), AGC's clipped fraction (`agc_clipping`), each of `claims` with its verdict, how
    much the test error still moved over the last `fraction` of training (`flatness`), and what twice the
    epochs changed (`budget_gain`, `budget_shift`). Parts whose runs
    are not recorded yet are left out."""
    out = []
    spp = spp_summary(record)
    if spp:
        cfg = record["config"]
        n = sorted({s["n_seeds"] for s in spp.values()})
        seeds = f"median of {n[0]} seed{'s' * (n[0] > 1)}" if len(n) == 1 else f"median of {n[0]}-{n[-1]} seeds"
        out.append(f"Signal propagation at initialization (ResNet-{cfg['spp_depth']}, {cfg['spp_batch']} test "
                   f"images, {seeds}): average channel variance after the first and the last block, "
                   + "; ".join(f"{SPP_NAMES[m]} {s['var_first']:.3g} and {s['var_last']:.3g}" for m, s in spp.items())
                   + ". Squared channel mean / variance after the last block: "
                   + "; ".join(f"{SPP_NAMES[m]} {s['mean_shift']:.2f}" for m, s in spp.items()) + ".")
    if "lrs" not in record.get("config", {}):
        return out
    chosen = chosen_lrs(record)
    if chosen:
        edges = [f"{ARM_NAMES[a]} ({c['at_edge']} end)" for a, c in chosen.items() if c["at_edge"]]
        out.append("Chosen lr (lowest validation error of the sweep): "
                   + "; ".join(f"{ARM_NAMES[a]} {c['lr']:g}" for a, c in chosen.items())
                   + (f". At the end of its grid: {'; '.join(edges)}." if edges else ". None at the end of its grid."))
    div = divergence(record)
    hit = [a for a in div if div[a]]
    said = "; ".join(f"{ARM_NAMES[a]}: " + ", ".join(f"{d['kind']} at lr {d['lr']:g} seed {d['seed']} (step {d['step']})"
                                                   for d in div[a]) for a in hit)
    rest = "; the other networks: none" if 0 < len(hit) < len(div) else ""
    out.append(f"Runs that diverged: {said}{rest}." if hit else "No run diverged.")
    errs = final_errors(record)
    if errs:
        ranked = sorted(errs.items(), key=lambda kv: kv[1]["mean"])

        def spread(e):
            parts = ([f"sd {e['sd']:.2f}"] if e["sd"] is not None else []) + [f"n={e['n']}"]
            return ", ".join(parts + ([f"{e['diverged']} diverged"] if e["diverged"] else []))

        out.append("Mean final test error over seeds, lowest first: "
                   + "; ".join(f"{ARM_NAMES[a]} {e['mean']:.2f}% ({spread(e)})" for a, e in ranked) + ".")
    if "nf" in errs:
        clip = [c for c in agc_clipping(record)["final"].values() if c["mean"] is not None]
        if clip:
            # one decimal: a fraction near 1 is the finding, and 0.9986 must not print as 100%
            out.append(f"AGC clipped {statistics.fmean(c['mean'] for c in clip):.1%} of the units per step on "
                       f"average over training, and {statistics.fmean(c['last'] for c in clip):.1%} in the last "
                       f"epoch (NF + AGC final runs, mean over {len(clip)} seeds).")
    for text, iv, word in claims(record, margin):
        out.append(f"{text}: {word} " + (f"(difference {iv.format(2)} points of test error, n={iv.n})." if iv else
                                           "(fewer than 2 shared seeds recorded so far)."))
    flat = flatness(record, fraction)
    if flat:
        span = next(iter(flat.values()))
        out.append(f"Largest change of any seed's test error over the last {fraction:.0%} of training (epochs "
                   f"{span['from_epoch']} to {span['to_epoch']}): "
                   + "; ".join(f"{ARM_NAMES[a]} {f['max_abs']:.2f}" for a, f in flat.items()) + " points.")
    gain = budget_gain(record)
    if gain:
        long = record["config"]["budget"]["epochs"]
        out.append(f"Training {long} instead of {record['config']['epochs']} epochs changed the final test error by "
                   + "; ".join(f"{ARM_NAMES[a]} {iv.format(2)}" for a, iv in gain.items()) + " points (paired by seed).")
        shift = budget_shift(record, margin)
        if shift:
            out.append(f"What the claims compare moved with the {long}-epoch budget by "
                       + "; ".join(f"{text}: {d['change'].format(2)}" for text, d in shift.items())
                       + " points.")
    return out
