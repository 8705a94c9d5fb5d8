"""What the whole-model timing experiments share (`inference_overhead`, `llama_step`): a fixed thread count,
the metrics of one interleaved `normlab.bench.compare`, and the look-up a record's readers start from.

Every such experiment stores the raw per-repeat times (`times_s`, seconds per call, repeat `r` at index
`r` for every variant), so a reader recomputes any ratio's bootstrap interval from the record instead of
trusting a rounded number (`ratio`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from ..stats import Interval, ratio_of_medians


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (`None`: torch's setting), then restore the old count."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (leave torch's setting), got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def loadavg() -> float | None:
    """The 1-minute load average: how busy the machine was while timing (None where unavailable)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def timing_metrics(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The per-variant part of a record from `bench.compare`'s result: raw times and their summaries."""
    return {
        "variants": list(stats),
        "times_s": {k: s["times"] for k, s in stats.items()},
        "median_ms": {k: s["median"] * 1e3 for k, s in stats.items()},
        "iqr_ms": {k: [s["q25"] * 1e3, s["q75"] * 1e3] for k, s in stats.items()},
        "min_ms": {k: s["min"] * 1e3 for k, s in stats.items()},
        "repeats": min(s["repeats"] for s in stats.values()),
    }


def ratio(times: dict[str, list[float]], num: str, den: str, confidence: float = 0.95) -> Interval:
    """median(times[num]) / median(times[den]), paired bootstrap over repeats (`stats.ratio_of_medians`)."""
    for key in (num, den):
        if key not in times:
            raise ValueError(f"variant {key!r} was not timed in this run; timed: {', '.join(times)}")
    return ratio_of_medians(times[num], times[den], confidence=confidence)


def find_run(record: dict[str, Any], experiment: str, **match: Any) -> dict[str, Any]:
    """The run of `record` whose config has every `match` value; a clear error naming what is recorded."""
    if record.get("experiment") != experiment:
        raise ValueError(f"this reader reads {experiment!r} records, got {record.get('experiment')!r}: "
                         f"load it with normlab.results.load({experiment!r})")
    for run in record["runs"]:
        if all(run["config"].get(k) == v for k, v in match.items()):
            return run
    recorded = sorted({tuple((k, r["config"].get(k)) for k in match) for r in record["runs"]})
    shown = "; ".join(", ".join(f"{k}={v!r}" for k, v in c) for c in recorded) or "no runs"
    want = ", ".join(f"{k}={v!r}" for k, v in match.items())
    raise ValueError(f"no {experiment} run with {want}; the record has: {shown}")
