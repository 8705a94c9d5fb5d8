"""The experiments of chapters 04 (RMSNorm speed) and 05 (WeightNorm / weight standardization training)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from normlab import norms, results, sweep
from normlab.experiments import norm_speed, wn_ws_training
from normlab.tasks import ImageClassification
from normlab.train import Trainer

# ------------------------------------------------------------------------------------------------
# norm_speed
# ------------------------------------------------------------------------------------------------


def test_norm_speed_profiles_and_runs():
    for name, config in norm_speed.PROFILES.items():
        json.dumps(config)  # JSON-able
        assert set(config["impls"]) <= set(norm_speed.IMPLS), name
        rs = norm_speed.runs(config)
        assert len(rs) == len(config["shapes"]) * len(config["seeds"]) * len(config["threads"])
        assert all({"tokens", "hidden", "threads", "seed"} <= set(r) for r in rs)
    assert norm_speed.PROFILES["cpu"]["impls"] == ["scratch", "native", "compiled"]
    assert norm_speed.PROFILES["cpu"]["threads"][0] == 2  # the machine's both cores first


def test_norm_speed_threads_are_set_and_restored():
    before = torch.get_num_threads()
    config = norm_speed.PROFILES["smoke"]
    m = norm_speed.run_one({"tokens": 32, "hidden": 16, "threads": 1, "seed": 0}, config)["metrics"]
    assert m["num_threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive int"):
        norm_speed.run_one({"tokens": 32, "hidden": 16, "threads": 0, "seed": 0}, config)


def test_norm_speed_smoke_run_records_timings_and_ratios():
    config = norm_speed.PROFILES["smoke"]
    run = norm_speed.runs(config)[0]
    out = norm_speed.run_one(run, config, device="cpu")
    m = out["metrics"]
    assert out["history"] == []
    assert set(m["timings"]) == {f"{i}/{n}" for i in config["impls"] for n in norm_speed.NORMS}
    for name, t in m["timings"].items():
        assert t["repeats"] == config["repeats"], name
        assert 0 < t["min_ms"] <= t["q25_ms"] <= t["median_ms"] <= t["q75_ms"], (name, t)
        assert t["median_ms"] < 1000, (name, t)  # a 256x64 tensor: far below a second
    for impl in config["impls"]:
        r = m[f"ratio_rms_ln_{impl}"]
        assert r == pytest.approx(m["timings"][f"{impl}/rms"]["median_ms"] / m["timings"][f"{impl}/ln"]["median_ms"])
        assert 0.01 < r < 100
        assert m[f"min_ratio_rms_ln_{impl}"] == pytest.approx(
            m["timings"][f"{impl}/rms"]["min_ms"] / m["timings"][f"{impl}/ln"]["min_ms"])
    assert m["compile_errors"] == {}
    json.dumps(m)


def test_norm_speed_layers_compute_ln_and_rms():
    """The timed modules are what they claim: scratch == native (forward), in float64."""
    x = torch.randn(16, 32, dtype=torch.float64)
    native = norm_speed.make_layers("native", 32, 1e-5)
    scratch = norm_speed.make_layers("scratch", 32, 1e-5)
    for norm in norm_speed.NORMS:
        a, b = scratch[norm].double()(x), native[norm].double()(x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert isinstance(scratch["ln"], norms.LayerNorm) and isinstance(scratch["rms"], norms.RMSNorm)


def test_norm_speed_fwd_bwd_does_not_accumulate():
    layer = nn.LayerNorm(8)
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    step = norm_speed.fwd_bwd(layer, x, g)
    step()
    first = x.grad.clone(), layer.weight.grad.clone()
    step()
    torch.testing.assert_close(x.grad, first[0])
    torch.testing.assert_close(layer.weight.grad, first[1])


def test_norm_speed_unknown_impl_raises():
    with pytest.raises(ValueError, match="choose from"):
        norm_speed.make_layers("cuda_graph", 8, 1e-5)


def test_norm_speed_records_compile_failure(monkeypatch):
    """A backend that cannot compile (e.g. no C++ compiler) is recorded, not a crash of the sweep."""

    class Broken(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Broken(m))
    monkeypatch.setattr(norm_speed, "reset_compiler", lambda: None)  # importing dynamo takes seconds
    config = {**norm_speed.PROFILES["smoke"], "impls": ["native", "compiled"]}
    m = norm_speed.run_one({"tokens": 32, "hidden": 16, "threads": None, "seed": 0}, config)["metrics"]
    assert set(m["compile_errors"]) == {"compiled/ln", "compiled/rms"}
    assert "C++ compiler" in m["compile_errors"]["compiled/ln"]
    assert "ratio_rms_ln_compiled" not in m and "ratio_rms_ln_native" in m
    assert set(m["timings"]) == {"native/ln", "native/rms"}


def test_norm_speed_sweep_writes_result_file(tmp_path):
    out = tmp_path / "smoke.json"
    record = sweep.sweep("norm_speed", "smoke", out=out, device="cpu", progress=False, log=None)
    assert out.exists() and json.loads(out.read_text())["runs"][0]["metrics"]["timings"]
    assert record["provenance"]["device"] == "cpu"


# ------------------------------------------------------------------------------------------------
# wn_ws_training
# ------------------------------------------------------------------------------------------------


def test_wn_ws_profiles_and_runs():
    for name, config in wn_ws_training.PROFILES.items():
        json.dumps(config)
        assert config["variants"] == list(wn_ws_training.VARIANTS), name
        if wn_ws_training.converged(config):
            continue  # per-variant lrs: tests/test_wn_ws_converged.py
        rs = wn_ws_training.runs(config)
        assert len(rs) == len(config["seeds"]) * len(config["variants"])
    assert len(wn_ws_training.PROFILES["cpu"]["seeds"]) >= 2


@pytest.mark.parametrize("variant", wn_ws_training.VARIANTS)
def test_small_cnn_variants_use_the_right_layers(variant):
    torch.manual_seed(0)
    model = wn_ws_training.SmallCNN(variant, [8, 16, 16], groups=4)
    kinds = {type(m) for m in model.modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert (norms.WSConv2d in kinds) == variant.startswith("ws")
    assert (norms.GroupNorm in kinds) == (variant == "ws_gn")
    assert (norms.BatchNorm2d in kinds) == (variant == "bn")
    has_wn = [hasattr(c, "parametrizations") and "weight" in c.parametrizations for c in convs]
    assert all(has_wn) if variant == "wn" else not any(has_wn)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_small_cnn_unknown_variant_raises():
    with pytest.raises(ValueError, match="choose from"):
        wn_ws_training.SmallCNN("layernorm", [8, 8, 8])


def test_ws_and_wn_cnn_are_invariant_to_weight_scale():
    """WS: the function ignores per-channel shifts and scales of W; WN: of v. A plain conv does not."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    for variant, shift in (("ws", True), ("wn", False)):
        model = wn_ws_training.SmallCNN(variant, [4, 8, 8], groups=4).double()
        for conv in model.modules():
            if isinstance(conv, norms.WSConv2d):
                conv.eps = 0.0  # exact invariance; eps > 0 breaks scale invariance by O(eps / var(W))
        y = model(x)
        with torch.no_grad():
            for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
                w = conv.parametrizations.weight.original1 if variant == "wn" else conv.weight
                scale = torch.rand(w.shape[0], 1, 1, 1, dtype=w.dtype) + 0.5
                w.mul_(scale)
                if shift:
                    w.add_(torch.randn(w.shape[0], 1, 1, 1, dtype=w.dtype))
        torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-8)


def _synthetic(n=256, seed=0):
    """Two well-separated classes of 1x16x16 uint8 images, bright left half vs bright right half.

    A spatial pattern, not a global offset: GroupNorm/InstanceNorm remove offsets by design.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    pattern = torch.ones(1, 16, 16)
    pattern[:, :, 8:] = -1
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1) * pattern
    x = (x * 40 + 128).round().clamp(0, 255).to(torch.uint8)
    return ImageClassification(x, y, x[:64], y[:64], augment=False)


@pytest.mark.parametrize("variant", ["plain", "wn", "ws_gn", "bn"])
def test_small_cnns_learn_a_separable_problem(variant):
    config = {**wn_ws_training.PROFILES["smoke"], "steps": 40, "batch_size": 32, "eval_every": 20,
              "n_eval": None, "warmup_steps": 2, "lr": 0.05}
    torch.manual_seed(0)
    model = wn_ws_training.SmallCNN(variant, [4, 8, 8], groups=4)
    trainer = Trainer(model, _synthetic(), wn_ws_training.train_config({"seed": 0}, config))
    history = trainer.fit()
    assert not trainer.diverged
    assert [h["step"] for h in history] == [20, 40]
    assert history[-1]["test_error"] < 5, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_wn_ws_training_reports_divergence():
    config = {**wn_ws_training.PROFILES["smoke"], "steps": 30, "batch_size": 32, "eval_every": 10,
              "n_eval": None, "warmup_steps": 1, "lr": 1e30}
    torch.manual_seed(0)
    model = wn_ws_training.SmallCNN("plain", [4, 8, 8])
    trainer = Trainer(model, _synthetic(), wn_ws_training.train_config({"seed": 0}, config))
    history = trainer.fit()
    assert trainer.diverged and history[-1]["diverged"] and history[-1]["train_loss"] is None


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="fashion_mnist or cifar10"):
        wn_ws_training.load_data({"dataset": "mnist", "n_train": 8, "n_test": 8})


@pytest.fixture(scope="module")
def smoke_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("wnws") / "smoke.json"
    return sweep.sweep("wn_ws_training", "smoke", out=out, device="cpu", progress=False, log=None)


def test_wn_ws_smoke_sweep_records_metrics(smoke_record):
    config = wn_ws_training.PROFILES["smoke"]
    runs = smoke_record["runs"]
    assert [r["config"]["variant"] for r in runs] == config["variants"]
    for r in runs:
        m = r["metrics"]
        assert 0.0 <= m["test_error"] <= 100.0 and m["n_test"] == config["n_test"] and m["n_train"] == config["n_train"]
        if not m["diverged"]:
            assert math.isfinite(m["test_loss"]) and m["test_loss"] > 0
        steps = [h["step"] for h in r["history"]]
        assert steps == list(range(config["eval_every"], config["steps"] + 1, config["eval_every"])) or m["diverged"]
        assert {"step", "train_loss", "grad_norm", "test_loss", "test_error"} <= set(r["history"][0])
    json.dumps(smoke_record)


def test_wn_ws_same_seed_same_result():
    config = {**wn_ws_training.PROFILES["smoke"], "steps": 4, "eval_every": 2}
    a = wn_ws_training.run_one({"variant": "bn", "seed": 3}, config)
    b = wn_ws_training.run_one({"variant": "bn", "seed": 3}, config)
    untimed = lambda r: [{k: v for k, v in h.items() if k != "time_s"} for h in r["history"]]  # noqa: E731
    assert a["metrics"] == b["metrics"] and untimed(a) == untimed(b)


@pytest.mark.slow
def test_norm_speed_compiled_path_runs_or_records_why_not():
    """A real torch.compile of the scratch layers (tens of seconds): timed, or its failure recorded."""
    config = {**norm_speed.PROFILES["smoke"], "impls": ["compiled"], "shapes": [[16, 8]], "repeats": 2}
    m = norm_speed.run_one({"tokens": 16, "hidden": 8, "seed": 0}, config)["metrics"]
    for norm in norm_speed.NORMS:
        name = f"compiled/{norm}"
        assert (name in m["timings"]) != (name in m["compile_errors"]), m
    if not m["compile_errors"]:
        assert m["ratio_rms_ln_compiled"] > 0
