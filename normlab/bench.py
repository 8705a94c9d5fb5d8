"""Benchmarks as benchmarks: interleaved repeats, medians and spread, ratios from one run.

Timing functions one after another lets drift (thermal, other processes) masquerade as a speed-up;
`compare` interleaves them — every repeat times each candidate once, in a rotating order — and reports
medians with the interquartile range, and the raw per-repeat times, so that `normlab.stats.ratio_of_medians`
can put a bootstrap interval on a ratio (resampling repeats jointly, as they were timed).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .stats import median_iqr


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], inner: int, device: torch.device | None) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def compare(
    fns: dict[str, Callable[[], object]],
    repeats: int = 21,
    warmup: int = 3,
    inner: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Time each callable `repeats` times, interleaved; seconds per call.

    Returns `{name: {"median", "q25", "q75", "min", "repeats", "times"}}`; `times` is the list of
    per-repeat seconds in repeat order (the same index is the same repeat for every name).
    """
    if not fns:
        raise ValueError("compare() needs at least one function to time")
    device = torch.device(device) if device is not None else None
    names = list(fns)
    for name in names:  # warm caches, allocators, compiled kernels
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_time_once(fns[name], inner, device))
    return {n: {**summarize(t), "times": t} for n, t in times.items()}


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles (`normlab.stats.median_iqr`), minimum and count of `times`."""
    q = median_iqr(times)
    return {"median": q.median, "q25": q.q25, "q75": q.q75, "min": min(times), "repeats": len(times)}


def ratio(stats: dict[str, dict[str, float]], num: str, den: str) -> float:
    """median(num) / median(den): > 1 means `num` is slower."""
    return stats[num]["median"] / stats[den]["median"]
