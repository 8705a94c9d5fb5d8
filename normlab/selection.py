"""Choices made from recorded runs: which learning rate a sweep picks, and whether training has stopped.

Every experiment that tunes a learning rate picks it with the same rule, so "each arm at its best lr"
means the same thing in every chapter:

- `sweep_scores(runs)`: the `{lr: [score of each seed, None where it diverged]}` map the two below take,
  from recorded sweep runs (each with `config["lr"]` and the score in its metrics).
- `lr_table(scores)`: per lr, the **median** over seeds of the score (validation error or loss; lower is
  better), how many seeds there were and how many diverged. A lr at which any seed diverged gets no score:
  a setting that fails one seed in three is not one a practitioner would pick.
- `choose_lr(scores)`: the lr with the lowest median; ties go to the smaller lr (the safer setting).
  The median, not the mean, so one unlucky seed does not move the choice.
- `edge(lr, grid)`: whether the choice sits at the end of the grid (then the grid may not bracket the
  best lr, and the chapter must say so or the grid be extended).

And the convergence check every converged protocol reports:

- `tail_change(history, metric, fraction)`: how much `metric` moved over the last `fraction` of
  training, $m(T) - m(t_0)$ with $t_0$ the last evaluation at or before $(1 - f)\\,T$. Negative: still
  falling. The experiments aggregate it over seeds (with `normlab.stats`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

__all__ = ["sweep_scores", "lr_table", "choose_lr", "edge", "tail_change"]


def sweep_scores(runs: Sequence[Mapping[str, Any]], metric: str = "val_error") -> dict[float, list[float | None]]:
    """`{lr: [metrics[metric] of each run at that lr, None where the run diverged]}` of recorded sweep runs
    (already filtered to one arm), in the runs' order: what `lr_table` and `choose_lr` read."""
    out: dict[float, list[float | None]] = {}
    for r in runs:
        m = r["metrics"]
        out.setdefault(r["config"]["lr"], []).append(None if m.get("diverged") else m.get(metric))
    return out


def lr_table(scores: Mapping[float, Sequence[float | None]], name: str = "score") -> list[dict[str, Any]]:
    """`[{"lr", name, "n", "diverged"}]`, sorted by lr: the median over seeds of `scores[lr]` (None if any
    seed diverged, given as None), the number of seeds and of diverged seeds.

    Example:
        >>> lr_table({0.1: [20.0, 22.0], 1.0: [15.0, None]})
        [{'lr': 0.1, 'score': 21.0, 'n': 2, 'diverged': 0}, {'lr': 1.0, 'score': None, 'n': 2, 'diverged': 1}]
    """
    rows = []
    for lr in sorted(scores):
        values = list(scores[lr])
        if not values:
            raise ValueError(f"lr {lr} has no runs: leave it out of the scores, or record its runs")
        bad = sum(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
        rows.append({"lr": lr, name: None if bad else statistics.median(values), "n": len(values), "diverged": bad})
    return rows


def choose_lr(scores: Mapping[float, Sequence[float | None]], what: str = "") -> float:
    """The lr with the lowest median score among lrs at which no seed diverged (ties: the smaller lr).

    `scores` maps each lr of the sweep to its seeds' scores, lower is better, None for a diverged run.
    `what` names the arm in the error raised when every lr diverged.

    Example:
        >>> choose_lr({0.01: [30.0, 31.0], 0.1: [20.0, 21.0], 1.0: [10.0, None]})
        0.1
    """
    ok = [row for row in lr_table(scores) if row["score"] is not None]
    if not ok:
        arm = f" of {what}" if what else ""
        raise ValueError(f"every lr of the sweep{arm} ({sorted(scores)}) diverged for some seed, or the sweep has no "
                         "runs: extend the profile's lr grid to smaller learning rates")
    return min(ok, key=lambda row: (row["score"], row["lr"]))["lr"]


def edge(lr: float, grid: Sequence[float]) -> str | None:
    """`"low"` / `"high"` if `lr` is the smallest / largest of `grid` (the grid may not bracket the best
    lr there), else None."""
    grid = sorted(grid)
    if lr not in grid:
        raise ValueError(f"lr {lr} is not in the grid {grid}")
    return "low" if lr == grid[0] else "high" if lr == grid[-1] else None


def tail_change(history: Sequence[Mapping[str, Any]], metric: str, fraction: float = 0.2, x: str = "epoch",
                end: float | None = None) -> tuple[float, float]:
    """`(t0, m(T) - m(t0))`: the change of `metric` over the last `fraction` of a run's `history`.

    $T$ is the `x` (``"epoch"`` or ``"step"``) of the last row with a value, $t_0$ the last row at or
    before $(1 - f)\\,T$. With `end`, the run must have reached it (a run cut short raises). Rows without
    the metric (evaluations are every k steps) are skipped.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie strictly between 0 and 1 (0.2: the last 20% of training), got {fraction!r}")
    rows = [h for h in history if h.get(metric) is not None and h.get(x) is not None]
    if not rows:
        raise ValueError(f"the history has no {metric!r} by {x!r}: was it recorded with evaluations?")
    last = rows[-1]
    if end is not None and last[x] != end:
        raise ValueError(f"the run's last {metric} is at {x} {last[x]}, not at the end ({end}): it did not finish")
    cut = (1 - fraction) * last[x]
    before = [h for h in rows if h[x] <= cut]
    if not before:
        raise ValueError(f"no {metric} at or before {x} {cut:g}: record with a smaller eval_every (at most "
                         f"{max(1, int(fraction * last[x]))} {x}s), or ask for a larger fraction")
    return before[-1][x], last[metric] - before[-1][metric]
