"""Pieces shared by the claims experiments (`lr_by_norm`, `small_data`, `bn_depth`, `running_stats`).

They measure claims of `CLAIMS.md` (IDs C01-C04, C06, C16, C19) on Fashion-MNIST with normlab's small
nets, every run on `normlab.train.Trainer`, seeded, with a step budget and a history row (with test
error) every `eval_every` steps. Here: checked config values, the data, the step-budget `TrainConfig`,
steps-to-target from a history, and the record readers the four modules build on (runs grouped by
config keys and paired by seed, the best learning rate of a cell, ratios across seeds).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping

import torch

from .. import selection
from ..results import runs_where
from ..stats import Interval, paired_difference
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig

# ----------------------------------------------------------------------------------- configuration


def check_choice(what: str, values: Iterable[Any], allowed: Iterable[Any]) -> list[Any]:
    """`values` as a non-empty list whose items are all in `allowed`, else a ValueError naming the fix."""
    values, allowed = list(values), list(allowed)
    if not values:
        raise ValueError(f"the config's {what!r} list is empty: give at least one of {allowed}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}: the config's {what!r} may only contain {allowed}")
    return values


def check_lrs(lrs: Iterable[float], what: str = "lrs") -> list[float]:
    """A non-empty list of positive, finite learning rates (the recorded grid), else a ValueError."""
    lrs = list(lrs)
    if not lrs:
        raise ValueError(f"the learning-rate grid {what!r} is empty: give at least one lr, e.g. [0.01, 0.03, 0.1]")
    bad = [lr for lr in lrs if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"learning rates must be positive finite numbers; {what!r} has {bad}")
    return lrs


def check_target(target_error: float, what: str = "target_error") -> float:
    """A test error in percent strictly between 0 and 100, else a ValueError naming the fix."""
    if not (isinstance(target_error, (int, float)) and 0 < target_error < 100):
        raise ValueError(f"{what} is a test error in percent and must lie strictly between 0 and 100, "
                         f"got {target_error!r}: e.g. 12.0 for 88% accuracy")
    return float(target_error)


# ----------------------------------------------------------------------------------- data, training

_DATA_CACHE: dict[tuple, tuple] = {}


def load_data(config: Mapping[str, Any]):
    """(train_x, train_y, test_x, test_y, source): uint8 images, random subsets fixed by `subset_seed`
    (`n_train`, `n_test`; None: all), cached per process. With one `subset_seed`, a smaller `n_train` is a
    prefix of a larger one's images (the same permutation), so training sets of different sizes nest."""
    from .. import data

    key = (config["dataset"], config["n_train"], config["n_test"], config["subset_seed"])
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        split = data.subset(data.load(config["dataset"]), config["n_train"], config["n_test"], config["subset_seed"])
        _DATA_CACHE[key] = (split.train_images, split.train_labels, split.test_images, split.test_labels,
                            split.source)
    return _DATA_CACHE[key]


def train_config(run: Mapping[str, Any], config: Mapping[str, Any], steps: int | None = None) -> TrainConfig:
    """SGD with momentum at the run's `lr`, a step budget (`steps`, default the config's), the config's
    `schedule` and `warmup_steps`, a history row with test error every `eval_every` steps."""
    return TrainConfig(steps=steps or config["steps"], epochs=None, batch_size=config["batch_size"], lr=run["lr"],
                       momentum=config["momentum"], weight_decay=config["weight_decay"],
                       schedule=config["schedule"], warmup=config.get("warmup_steps", 0),
                       eval_every=config["eval_every"], seed=run["seed"])


def evaluate(trainer: Trainer, task: ImageClassification, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """`test_loss` and `test_error` (percent) of the trainer's model in eval mode on `images`, normalized
    as the training images of `task` are."""
    t = ImageClassification(task.x, task.y, images, labels, augment=False, mean=task.mean, std=task.std)
    return t.to(trainer.device).evaluate(trainer.model)


def fit(model: torch.nn.Module, run: Mapping[str, Any], config: Mapping[str, Any], data: tuple, *,
        checkpoint=None, device: torch.device | str = "cpu", progress: bool = False, desc: str = "train",
        hooks: Iterable = (), steps: int | None = None) -> tuple[Trainer, ImageClassification, dict[str, Any]]:
    """Train `model` on `data` (`load_data`'s tuple) with `train_config`; returns (trainer, task, result).

    The history's test error (every `eval_every` steps) is on the first `n_eval` test images (None:
    all), to keep evaluation cheap; the final `test_error`/`test_loss` are on the whole test set.
    `result["metrics"]`: the trainer's summary (`train_loss`, `train_error`, `steps`, `diverged`), the
    whole-test-set numbers, `lr`, `steps_to_target` (when the config has a `target_error`),
    `data_source`, `n_train`, `n_test`.
    """
    trx, try_, tex, tey, source = data
    n_eval = config.get("n_eval") or len(tex)
    task = ImageClassification(trx, try_, tex[:n_eval], tey[:n_eval], augment=False)
    trainer = Trainer(model, task, train_config(run, config, steps), hooks=list(hooks), checkpoint=checkpoint,
                      device=device)
    history = trainer.fit(progress=progress, desc=desc)
    metrics = {**trainer.summary(), "lr": run["lr"]}
    if not trainer.diverged:
        metrics.update(evaluate(trainer, task, tex, tey))
    if "target_error" in config:
        metrics["steps_to_target"] = steps_to_target(history, config["target_error"])
    metrics.update(data_source=source, n_train=len(trx), n_test=len(tex))
    return trainer, task, {"metrics": metrics, "history": history}


def steps_to_target(history: list[Mapping[str, Any]], target_error: float, metric: str = "test_error") -> int | None:
    """The first evaluated step whose `metric` (percent) is at most `target_error`; None if never.

    Resolution: the history's evaluation interval (`eval_every`). Rows without the metric (not
    evaluated, or None after a divergence) are skipped.
    """
    check_target(target_error)
    for row in history:
        value = row.get(metric)
        if value is not None and value <= target_error:
            return int(row["step"])
    return None


# ----------------------------------------------------------------------------------- record readers


def grid(record: Mapping[str, Any], key: str, **conditions: Any) -> list[Any]:
    """The sorted distinct values of config `key` among the runs matching `conditions`."""
    return sorted({r["config"][key] for r in runs_where(record, **conditions)})


def _cell_ok(runs: list[dict[str, Any]], max_error: float | None) -> bool:
    return bool(runs) and all(not r["metrics"].get("diverged") and r["metrics"].get("test_error") is not None
                              and (max_error is None or r["metrics"]["test_error"] < max_error) for r in runs)


def trains(record: Mapping[str, Any], max_error: float | None = None, **conditions: Any) -> bool:
    """Every recorded seed of the cell finished without diverging (and below `max_error` percent, if given)."""
    return _cell_ok(runs_where(record, **conditions), max_error)


def best_lr(record: Mapping[str, Any], criterion: str = "test_error", target_error: float | None = None,
            **conditions: Any) -> float:
    """The cell's lr (from the recorded grid) with the lowest median over seeds of `criterion`.

    `criterion` is `"test_error"` (final test error) or `"steps_to_target"` (steps to `target_error`,
    recomputed from the histories; a seed that never reaches it counts as infinitely slow). Only
    learning rates at which no seed diverged compete; ties go to the smaller lr. ValueError if the
    cell has no runs or diverged at every lr.
    """
    if criterion not in ("test_error", "steps_to_target"):
        raise ValueError(f"criterion must be 'test_error' or 'steps_to_target', got {criterion!r}")
    lrs = grid(record, "lr", **conditions)
    if not lrs:
        raise ValueError(f"no runs with {conditions} in the record: check the names against its config")
    if criterion == "steps_to_target" and target_error is None:
        raise ValueError("criterion='steps_to_target' needs target_error= (e.g. the config's)")

    def score(r: Mapping[str, Any]) -> float | None:
        if not _cell_ok([r], None):
            return None  # diverged: rules its lr out
        if criterion == "test_error":
            return r["metrics"]["test_error"]
        steps = steps_to_target(r["history"], target_error)
        return math.inf if steps is None else steps

    scores = {lr: [score(r) for r in runs_where(record, lr=lr, **conditions)] for lr in lrs}
    return selection.choose_lr(scores, str(conditions))


def ratio_across_seeds(num: Mapping[int, float], den: Mapping[int, float], *, confidence: float = 0.95) -> Interval:
    """The geometric mean over seeds of `num[s] / den[s]`, with a t interval computed on the logarithms.

    $\\exp(\\overline{\\log r} \\pm t_{n-1}\\, s_{\\log r}/\\sqrt n)$: ratios of step counts are skewed
    and multiplicative, so the interval is symmetric on the log scale. `sd`/`se` of the returned
    `Interval` are those of the logs; `method` is `"t-log"`. Values must be positive and paired by seed.
    """
    for side, values in (("num", num), ("den", den)):
        bad = {s: v for s, v in values.items() if v is None or not v > 0}
        if bad:
            raise ValueError(f"{side} has non-positive or missing values {bad}: a ratio needs every seed "
                             "to have reached the target (lower the target or train longer)")
    d = paired_difference({s: math.log(v) for s, v in num.items()}, {s: math.log(v) for s, v in den.items()},
                          confidence=confidence)
    return Interval(math.exp(d.estimate), math.exp(d.low), math.exp(d.high), d.n, "t-log", d.confidence,
                    sd=d.sd, se=d.se, df=d.df)
