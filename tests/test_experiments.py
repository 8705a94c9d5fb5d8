"""Every experiment's `run_one` on its smoke profile: the book's record keys, sane values, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from normlab import results
from normlab.experiments import available, get_experiment

#: Benchmarks: their metrics are timings, which differ from one run to the next.
TIMINGS = {"bn_fold_speed", "norm_speed", "trainer_speed", "gn_batch_size_cost", "inference_overhead", "llama_step"}


def _untimed(result):
    drop = {"time_s", "wall_s"}
    return result["metrics"], [{k: v for k, v in h.items() if k not in drop} if isinstance(h, dict) else h
                               for h in result["history"]]


@pytest.mark.parametrize("name", available())
def test_smoke_run_one_keys_ranges_and_determinism(name):
    exp = get_experiment(name)
    assert {"smoke", "cpu"} <= set(exp.PROFILES), "every experiment has a smoke and a cpu profile"
    config = exp.PROFILES["smoke"]
    run = exp.runs(config)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, so that two runs can be compared bit for bit
    try:
        first = exp.run_one(run, config, torch.device("cpu"))
        assert set(first) >= {"metrics", "history"}
        _, replaced = results.finite(first)
        assert not replaced or first["metrics"].get("diverged"), "a non-finite number without diverged: true"
        m = first["metrics"]
        if "test_error" in m and m["test_error"] is not None:
            assert 0 <= m["test_error"] <= 100, m
        for key in ("test_loss", "train_loss", "val_loss"):
            assert m.get(key) is None or m[key] >= 0, (key, m)
        if "steps" in m:
            assert isinstance(m["steps"], int) and m["steps"] > 0
        if "diverged" in m:
            assert isinstance(m["diverged"], bool)
        assert not {"test_acc", "final_val_loss", "final_train_loss", "data", "dataset", "train_steps"} & set(m), \
            "old record keys: use the book's (normlab.migrate.RECORD_KEYS)"
        if name not in TIMINGS:
            assert _untimed(exp.run_one(run, config, torch.device("cpu"))) == _untimed(first), "not deterministic"
    finally:
        torch.set_num_threads(threads)
