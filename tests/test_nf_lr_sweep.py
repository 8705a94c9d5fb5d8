"""nf_resnet's lr-sweep comparison (profiles with `lrs`, e.g. cpu_converged): runs, the lr choice,
the dependency of final runs on the recorded sweep, AGC clip-fraction bookkeeping, and the readers."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch

from normlab import nf, sweep
from normlab.data import Split
from normlab.experiments import NotReady
from normlab.experiments import nf_resnet as exp
from normlab.stats import t_quantile

CONVERGED = exp.PROFILES["cpu_converged"]
SMOKE = exp.PROFILES["smoke_converged"]


@pytest.fixture
def fake_cifar(monkeypatch):
    """Random 32-px images in place of CIFAR-10 (fast, no data files); the split cache starts empty."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(512) % 10,
                  torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(256) % 10,
                  "random images")
    monkeypatch.setattr(exp, "_dataset", lambda name: split)
    monkeypatch.setattr(exp, "_VAL_CACHE", {})
    return split


# ---------------------------------------------------------------------------------------------------
# the profile and its runs


def test_converged_profile_runs_sweep_then_fresh_seeds():
    rs = exp.runs(CONVERGED)
    kinds = [r["kind"] for r in rs]
    assert kinds.count("spp") == 4 * 3 and kinds.count("train") == 0  # 4 networks x 3 draws at initialization
    sweeps = [r for r in rs if r["kind"] == "sweep"]
    finals = [r for r in rs if r["kind"] == "final"]
    assert len(sweeps) == sum(len(v) for v in CONVERGED["lrs"].values()) == 18 and len(finals) == 4 * 3
    assert max(i for i, r in enumerate(rs) if r["kind"] == "sweep") < min(i for i, r in enumerate(rs) if r["kind"] == "final")
    assert [r["seed"] for r in finals] == [1] * 4 + [2] * 4 + [3] * 4  # seed by seed: a partial record pairs
    assert all("lr" not in r for r in finals), "a final run's identity must not depend on the sweep's outcome"
    assert {r["seed"] for r in sweeps}.isdisjoint({r["seed"] for r in finals})
    budget = [r for r in rs if r["kind"] == "budget"]  # twice the epochs, after every final, paired with them
    assert CONVERGED["budget"]["epochs"] == 2 * CONVERGED["epochs"] and len(budget) == 4 * 3
    assert min(i for i, r in enumerate(rs) if r["kind"] == "budget") > max(i for i, r in enumerate(rs) if r["kind"] == "final")
    assert [(r["model"], r["seed"]) for r in budget] == [(r["model"], r["seed"]) for r in finals]
    assert all("lr" not in r for r in budget)
    for arm, grid in CONVERGED["lrs"].items():  # a factor-~3 grid per network
        assert all(2.5 < b / a < 3.5 for a, b in zip(grid, grid[1:])), (arm, grid)
    assert CONVERGED["image_size"] == 16 and CONVERGED["padding"] == 2 and CONVERGED["train_size"] is None
    assert CONVERGED["test_size"] is None and CONVERGED["val_size"] == 5000 and CONVERGED["eval_every"] == 1


@pytest.mark.parametrize("change, match", [
    ({"lrs": {"bn": [0.1], "layernorm": [0.1]}}, "unknown lrs model 'layernorm'"),
    ({"lrs": {"bn": [0.1, -0.3]}}, r"lrs\['bn'\] must be a non-empty list"),
    ({"lrs": {"bn": [0.1, 0.1]}}, "distinct"),
    ({"lrs": {"bn": []}}, "non-empty"),
    ({"sweep_seeds": []}, "needs sweep_seeds"),
    ({"final_seeds": [1]}, "at least 2 seeds"),
    ({"final_seeds": [0, 1, 2]}, "repeat sweep_seeds"),
    ({"val_size": 0}, "set val_size"),
    ({"budget": {"epochs": 30, "seeds": [1, 2, 3]}}, r"budget epochs must be an integer above the final runs' 30 \(e.g. 60\)"),
    ({"budget": {"epochs": 60, "seeds": [1, 4]}}, r"budget seeds must be at least 2 of final_seeds \[1, 2, 3\]"),
    ({"budget": {"epochs": 60, "seeds": [1]}}, "at least 2 of final_seeds"),
    ({"budget": {"epochs": 60, "seed": [1, 2]}}, r"budget must be \{'epochs': E, 'seeds'"),
    ({"lrs": {}, "budget": {"epochs": 60, "seeds": [1, 2]}}, "budget check reruns the final runs for longer"),
])
def test_bad_lr_sweep_profiles_name_the_fix(change, match):
    with pytest.raises(ValueError, match=match):
        exp.runs({**CONVERGED, **change})


def test_bad_split_and_bn_impl_name_the_fix(fake_cifar):
    config = {**SMOKE, "val_size": 512}
    with pytest.raises(ValueError, match=r"val_size must be between 1 and 511 \(there are 512 training images\).*nf_resnet.py"):
        exp.run_one({"kind": "sweep", "model": "none", "lr": 0.01, "seed": 0}, config)
    with pytest.raises(ValueError, match="bn_impl must be 'normlab'.*or 'fused'"):
        exp.build_model("train", "bn", {**config, "bn_impl": "cudnn"}, 3)


def test_the_validation_split_is_held_out_and_fixed(fake_cifar):
    config = {**SMOKE, "train_size": None}
    trx, _, vx, vy, tex, _, source = exp._val_split(config)
    assert len(vx) == config["val_size"] and len(trx) == 512 - config["val_size"] and len(tex) == 256
    assert trx.shape[-1] == vx.shape[-1] == tex.shape[-1] == 16 and "downsampled to 16x16" in source
    flat = lambda t: {bytes(x.numpy()) for x in t}  # noqa: E731
    assert not flat(trx) & flat(vx), "a validation image is also a training image"
    again = exp._val_split({**config, "epochs": 7})  # same split whatever else changes
    assert torch.equal(again[2], vx) and torch.equal(again[3], vy)


# ---------------------------------------------------------------------------------------------------
# choosing the lr; final runs wait for their sweep


def _sweep_run(model, lr, val_error, seed=0, diverged=False, clip=None):
    metrics = {"val_error": val_error, "test_error": 50.0, "diverged": diverged, "diverged_step": 7 if diverged else None,
               "lr": lr}
    if clip is not None:
        metrics.update(agc_clip_fraction=clip[0], agc_clip_fraction_last=clip[1])
    return {"config": {"kind": "sweep", "model": model, "lr": lr, "seed": seed}, "seed": seed, "metrics": metrics,
            "history": []}


@pytest.mark.parametrize("kind", ["final", "budget"])
def test_final_and_budget_runs_need_their_sweep(fake_cifar, kind):
    run = {"kind": kind, "model": "bn", "seed": 1}
    with pytest.raises(ValueError, match=f"a {kind} run trains at the lr its sweep chose: pass record="):
        exp.run_one(run, SMOKE)
    with pytest.raises(NotReady, match=r"bn's lr sweep lacks lr \[0.1\]"):
        exp.run_one(run, SMOKE, record={"config": SMOKE, "runs": [_sweep_run("bn", 0.03, 40.0)]})


def test_a_final_run_trains_at_the_lr_its_sweep_chose(fake_cifar):
    config = SMOKE
    run = {"kind": "final", "model": "bn", "seed": 1}
    record = {"config": config, "runs": [_sweep_run("bn", 0.03, 40.0)]}
    diverged = {"config": config, "runs": [_sweep_run("bn", 0.03, 90.0, diverged=True),
                                           _sweep_run("bn", 0.1, 90.0, diverged=True)]}
    with pytest.raises(ValueError, match=r"bn: every lr of the sweep .*diverged.*PROFILES\[...\]\['lrs'\]\['bn'\]"):
        exp.run_one(run, config, record=diverged)
    record["runs"].append(_sweep_run("bn", 0.1, 45.0))  # 0.03 wins on validation error
    out = exp.run_one(run, config, record=record)
    assert out["metrics"]["lr"] == 0.03 and max(h["lr"] for h in out["history"]) == pytest.approx(0.03)  # after warmup
    assert out["metrics"]["n_val"] == config["val_size"] and out["metrics"]["val_error"] is not None
    assert _untimed(out) == _untimed(exp.run_one(run, config, record=record)), "not deterministic"


def test_a_budget_run_trains_longer_at_the_chosen_lr(fake_cifar):
    config = SMOKE
    run = {"kind": "budget", "model": "bn", "seed": 1}
    record = {"config": config, "runs": [_sweep_run("bn", 0.03, 40.0), _sweep_run("bn", 0.1, 35.0)]}  # 0.1 wins
    out = exp.run_one(run, config, record=record)
    assert out["metrics"]["lr"] == 0.1 and out["metrics"]["epochs_done"] == config["budget"]["epochs"] == 3
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    final = exp.run_one({"kind": "final", "model": "bn", "seed": 1}, config, record=record)
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    # the first epoch's batches are the same; the cosine schedule is longer, so its lr is higher after warmup
    assert out["history"][-1]["lr"] != final["history"][-1]["lr"]


def _untimed(result):
    return result["metrics"], [{k: v for k, v in h.items() if k != "time_s"} for h in result["history"]]


def test_smoke_converged_end_to_end(fake_cifar, tmp_path):
    """The whole smoke_converged profile (the chapter's smoke run) through the sweep: finals at the lr the
    readers say was chosen, and every reader the chapter calls accepts the record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = sweep.sweep("nf_resnet", "smoke_converged", out=tmp_path / "s.json", progress=False, log=None)
    finally:
        torch.set_num_threads(threads)
    assert rec["complete"] and {r["config"]["kind"] for r in rec["runs"]} == {"spp", "sweep", "final", "budget"}
    json.dumps(rec, allow_nan=False)
    chosen = exp.chosen_lrs(rec)  # raises if a final run trained at another lr than the sweep chooses
    assert set(chosen) == set(exp.ARMS)
    assert all(r["metrics"]["lr"] == chosen[r["config"]["model"]]["lr"] for r in rec["runs"]
               if r["config"]["kind"] == "final")
    errs = exp.final_errors(rec)
    assert all(e["n"] == 2 and 0 <= e["mean"] <= 100 for e in errs.values())
    assert set(exp.paired_vs_bn(rec)) == {"nf", "nf_noagc", "none"}
    clip = exp.agc_clipping(rec)
    assert set(clip["final"]) == {1, 2} and all(0 <= v["mean"] <= 1 and 0 <= v["last"] <= 1 for v in clip["final"].values())
    assert set(exp.flatness(rec)) <= set(exp.ARMS) and set(exp.divergence(rec)) == set(exp.ARMS)
    bn = next(r for r in rec["runs"] if r["config"]["kind"] == "final" and r["config"]["model"] == "bn")
    assert bn["metrics"]["precision"] == "bf16" and bn["metrics"]["memory_format"] == "channels_last"
    assert all("val_error" in h and "test_error" in h for h in bn["history"])  # every epoch (eval_every 1)
    for c in exp.curves(rec).values():
        assert c["epoch"] == [1, 2] and all(lo <= m <= hi for lo, m, hi in zip(c["min"], c["mean"], c["max"]))
    assert [row[0].split(" [")[0] for row in exp.claims(rec)] == [t.format(margin=exp.MATCH_MARGIN) for t, *_ in exp.CLAIMS]
    assert set(exp.spp_summary(rec)) == set(exp.SPP_MODELS) and {s["n_seeds"] for s in exp.spp_summary(rec).values()} == {3}
    assert set(exp.budget_gain(rec)) == set(exp.ARMS) and len(exp.budget_shift(rec)) == len(exp.CLAIMS)
    assert all(r["metrics"]["lr"] == chosen[r["config"]["model"]]["lr"] and r["metrics"]["epochs_done"] == 3
               for r in rec["runs"] if r["config"]["kind"] == "budget")
    assert set(exp.curves(rec, kind="budget")) == set(exp.ARMS)
    assert len(exp.findings(rec)) == 8 + len(exp.CLAIMS)


# ---------------------------------------------------------------------------------------------------
# AGC's clip fraction


def test_agc_counts_clipped_units_on_a_hand_made_case():
    """5 units: a 3-row weight with rows 0 and 2 over the threshold, a bias (one unit) over it, a
    per-channel gain (one unit) under it: 3 of 5 clipped."""
    w = torch.nn.Parameter(torch.ones(3, 4))        # each row's norm 2: threshold 0.01 * 2 = 0.02
    w.grad = torch.tensor([[0.1, 0, 0, 0], [0.01, 0, 0, 0], [0, 0.03, 0, 0]])
    b = torch.nn.Parameter(torch.zeros(3))          # norm 0 -> eps: threshold 0.01 * 1e-3
    b.grad = torch.tensor([1e-4, 0.0, 0.0])
    gain = torch.nn.Parameter(torch.ones(3, 1, 1, 1))  # one unit, norm sqrt(3)
    gain.grad = torch.full((3, 1, 1, 1), 1e-3)
    assert nf.adaptive_grad_clip_([w, b, gain], clip=0.01, eps=1e-3) == pytest.approx(3 / 5)


def test_clip_summary_weights_rows_by_their_steps():
    history = [{"step": 10, "agc_clip_fraction": 1.0}, {"step": 20, "agc_clip_fraction": 0.5},
               {"step": 25, "agc_clip_fraction": 0.0, "diverged": True}]  # a last row cut short at step 25
    assert exp.clip_summary(history) == pytest.approx({"agc_clip_fraction": 0.6, "agc_clip_fraction_last": 0.0})
    assert exp.clip_summary([{"step": 10, "train_loss": 1.0}]) == {}


def test_run_metrics_average_the_per_step_clip_fractions(fake_cifar, monkeypatch):
    """The run's agc_clip_fraction is the mean of what AGC returned at every step, and _last the mean over
    the last epoch's steps."""
    seen = []
    real = nf.adaptive_grad_clip_

    def counting(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(nf, "adaptive_grad_clip_", counting)
    config = {**SMOKE, "train_size": 192, "batch_size": 32}  # 6 steps per epoch, 2 epochs
    out = exp.run_one({"kind": "sweep", "model": "nf", "lr": 0.3, "seed": 0}, config)
    assert len(seen) == 12 and all(0 <= f <= 1 for f in seen)
    assert out["metrics"]["agc_clip_fraction"] == pytest.approx(sum(seen) / 12, rel=1e-9)
    assert out["metrics"]["agc_clip_fraction_last"] == pytest.approx(sum(seen[6:]) / 6, rel=1e-9)
    assert [h["agc_clip_fraction"] for h in out["history"]] == pytest.approx([sum(seen[:6]) / 6, sum(seen[6:]) / 6])


# ---------------------------------------------------------------------------------------------------
# the readers, on a hand-built record with known answers


def _final(model, seed, lr, test_error, history=(), diverged=False, clip=None):
    metrics = {"test_error": test_error, "lr": lr, "diverged": diverged, "diverged_step": 99 if diverged else None}
    if clip is not None:
        metrics.update(agc_clip_fraction=clip[0], agc_clip_fraction_last=clip[1])
    return {"config": {"kind": "final", "model": model, "seed": seed}, "seed": seed, "metrics": metrics,
            "history": list(history)}


def _curve(end, at8):
    """10 epochs of test error: 60 at first, `at8` at epoch 8, `end` at epoch 10."""
    return [{"epoch": e, "step": 10 * e, "test_error": {8: at8, 9: (at8 + end) / 2, 10: end}.get(e, 60.0)}
            for e in range(1, 11)]


def _fake_record():
    config = {**CONVERGED, "epochs": 10, "lrs": {"bn": [0.03, 0.1, 0.3], "nf": [0.1, 0.3], "none": [0.01, 0.03]},
              "final_seeds": [1, 2, 3]}
    runs = [_sweep_run("bn", 0.03, 30.0), _sweep_run("bn", 0.1, 25.0), _sweep_run("bn", 0.3, 27.0),
            _sweep_run("nf", 0.1, 31.0, clip=(0.9, 0.8)), _sweep_run("nf", 0.3, 29.0, clip=(0.97, 0.99)),
            _sweep_run("none", 0.01, 40.0), _sweep_run("none", 0.03, 90.0, diverged=True)]
    bn = {1: 24.0, 2: 25.0, 3: 26.0}
    nf_ = {1: 23.0, 2: 23.0, 3: 23.0}        # nf - bn = -1, -2, -3
    none = {1: 35.0, 2: 90.0, 3: 36.0}       # seed 2 diverged
    runs += [_final("bn", s, 0.1, e, _curve(e, e + 1.0)) for s, e in bn.items()]
    runs += [_final("nf", s, 0.3, e, _curve(e, e + 0.5), clip=(0.95, 0.5 + s / 10)) for s, e in nf_.items()]
    runs += [_final("none", s, 0.01, e, _curve(e, e), diverged=s == 2) for s, e in none.items()]
    return {"experiment": "nf_resnet", "profile": "cpu_converged", "config": config, "runs": runs}


def test_readers_give_known_answers():
    rec = _fake_record()
    assert exp.lr_sweep(rec) == {"bn": {0.03: 30.0, 0.1: 25.0, 0.3: 27.0}, "nf": {0.1: 31.0, 0.3: 29.0},
                                 "none": {0.01: 40.0, 0.03: None}}
    assert exp.chosen_lrs(rec) == {"bn": {"lr": 0.1, "val_error": 25.0, "at_edge": None},
                                   "nf": {"lr": 0.3, "val_error": 29.0, "at_edge": "high"},
                                   "none": {"lr": 0.01, "val_error": 40.0, "at_edge": "low"}}
    errs = exp.final_errors(rec)
    assert errs["bn"]["mean"] == 25.0 and errs["bn"]["sd"] == pytest.approx(1.0) and errs["bn"]["n"] == 3
    assert (errs["bn"]["min"], errs["bn"]["max"], errs["bn"]["lr"]) == (24.0, 26.0, 0.1)
    assert errs["none"]["diverged"] == 1 and errs["none"]["seeds"][2] == 90.0 and errs["nf"]["diverged"] == 0
    d = exp.paired_vs_bn(rec)
    assert set(d) == {"nf", "none"}
    half = t_quantile(0.975, 2) * 1.0 / math.sqrt(3)  # differences -1, -2, -3: sd 1
    assert d["nf"].estimate == pytest.approx(-2.0) and d["nf"].n == 3
    assert (d["nf"].low, d["nf"].high) == pytest.approx((-2.0 - half, -2.0 + half))
    assert d["none"].estimate == pytest.approx((11 + 65 + 10) / 3)
    clip = exp.agc_clipping(rec)
    assert clip["sweep"] == {0.1: {"mean": 0.9, "last": 0.8}, 0.3: {"mean": 0.97, "last": 0.99}}
    widened = copy.deepcopy(rec)  # a grid widened downwards appends its run: the reader still sorts by lr
    low = copy.deepcopy(next(r for r in widened["runs"] if r["config"].get("kind") == "sweep"
                             and r["config"]["model"] == "nf"))
    low["config"]["lr"] = 0.03
    widened["runs"].append(low)
    assert list(exp.agc_clipping(widened)["sweep"]) == [0.03, 0.1, 0.3]
    assert clip["final"][2] == {"mean": 0.95, "last": pytest.approx(0.7)}
    assert exp.divergence(rec) == {"bn": [], "nf": [], "none": [{"kind": "sweep", "lr": 0.03, "seed": 0, "step": 7},
                                                                {"kind": "final", "lr": 0.01, "seed": 2, "step": 99}]}
    flat = exp.flatness(rec)
    assert flat["bn"] == {"from_epoch": 8, "to_epoch": 10, "seeds": {1: -1.0, 2: -1.0, 3: -1.0}, "mean": -1.0,
                          "max_abs": 1.0}
    assert flat["nf"]["mean"] == pytest.approx(-0.5) and set(flat["none"]["seeds"]) == {1, 3}  # diverged left out
    assert exp.flatness(rec, fraction=0.5)["bn"]["from_epoch"] == 5


def test_readers_refuse_what_they_cannot_read():
    rec = _fake_record()
    with pytest.raises(ValueError, match="no lr sweep.*cpu_converged"):
        exp.lr_sweep({"profile": "cpu", "config": exp.PROFILES["cpu"], "runs": []})
    wrong = copy.deepcopy(rec)
    for r in wrong["runs"]:
        if r["config"]["kind"] == "final" and r["config"]["model"] == "bn":
            r["metrics"]["lr"] = 0.3
    with pytest.raises(ValueError, match=r"bn's final runs trained at lr \[0.3\].*record them again"):
        exp.chosen_lrs(wrong)
    with pytest.raises(ValueError, match="fraction must lie strictly between 0 and 1"):
        exp.flatness(rec, fraction=1.0)
    sparse = _fake_record()
    for r in sparse["runs"]:
        r["history"] = [h for h in r["history"] if h["epoch"] == 10]
    with pytest.raises(ValueError, match=r"no test_error at or before epoch 8.*smaller eval_every \(at most 2 epochs\)"):
        exp.flatness(sparse)
    no_bn = {**rec, "runs": [r for r in rec["runs"] if r["config"]["model"] != "bn" or r["config"]["kind"] != "final"]}
    with pytest.raises(ValueError, match="no final BN runs"):
        exp.paired_vs_bn(no_bn)
    no_nf = {**rec, "config": {**rec["config"], "lrs": {"bn": [0.1]}}}
    with pytest.raises(ValueError, match="no NF \\+ AGC runs"):
        exp.agc_clipping(no_nf)


def test_curves_give_known_answers():
    curves = exp.curves(_fake_record())
    assert set(curves) == {"bn", "nf", "none"} and curves["bn"]["epoch"] == list(range(1, 11))
    assert (curves["bn"]["mean"][-1], curves["bn"]["min"][-1], curves["bn"]["max"][-1]) == (25.0, 24.0, 26.0)
    assert curves["bn"]["mean"][7] == 26.0 and curves["bn"]["mean"][0] == 60.0 and curves["bn"]["n"] == 3
    assert curves["none"]["n"] == 2 and curves["none"]["mean"][-1] == 35.5  # the diverged seed 2 is left out
    assert exp.curves(_fake_record(), "train_loss") == {}  # no run has it at every epoch


def _with_noagc(rec, errors):
    """`rec` with NF-without-AGC sweep and final runs at lr 0.03 (final test errors `errors`)."""
    rec = copy.deepcopy(rec)
    rec["config"]["lrs"]["nf_noagc"] = [0.03]
    rec["runs"] += [_sweep_run("nf_noagc", 0.03, 35.0)]
    rec["runs"] += [_final("nf_noagc", s, 0.03, e, _curve(e, e)) for s, e in errors.items()]
    return rec


def test_claims_give_known_verdicts():
    rec = _with_noagc(_fake_record(), {1: 30.0, 2: 31.0, 3: 33.0})  # nf_noagc - nf = 7, 8, 10
    rows = exp.claims(rec)
    assert [text for text, _, _ in rows] == [
        "NF + AGC matches BN (within ±1)", "NF without AGC trails NF + AGC",
        "BN beats the unnormalized net [no norm: 1 of 3 final runs diverged]",
        "NF + AGC beats the unnormalized net [no norm: 1 of 3 final runs diverged]",
        "NF without AGC matches BN (within ±1)"]
    t = t_quantile(0.975, 2)
    match, trails, bn_none, nf_none, noagc_match = rows
    # nf_noagc - bn = 6, 6, 7: the whole interval [4.90, 7.77] lies above the margin
    assert noagc_match[1].estimate == pytest.approx(19 / 3) and noagc_match[2] == "does not hold"
    assert noagc_match[1].low > 1.0
    # nf - bn = -1, -2, -3: -2 +- t / sqrt(3) = [-4.48, 0.48] reaches past -1 and into +-1
    assert match[1].estimate == pytest.approx(-2.0) and match[2] == "within noise"
    assert exp.claims(rec, margin=5.0)[0][0] == "NF + AGC matches BN (within ±5)"
    assert exp.claims(rec, margin=5.0)[0][2] == "holds"
    sd = statistics.stdev([7.0, 8.0, 10.0])
    assert trails[1].estimate == pytest.approx(25 / 3) and trails[2] == "holds"
    assert trails[1].low == pytest.approx(25 / 3 - t * sd / math.sqrt(3))
    assert bn_none[1].estimate == pytest.approx((-11 - 65 - 10) / 3) and bn_none[2] == "within noise"
    assert nf_none[1].estimate == pytest.approx((-12 - 67 - 13) / 3) and nf_none[1].n == 3
    worse = copy.deepcopy(rec)  # NF + AGC exactly 6 points above BN on every seed: outside the margin
    for r in worse["runs"]:
        if r["config"] == {"kind": "final", "model": "nf", "seed": r["seed"]}:
            r["metrics"]["test_error"] = {1: 30.0, 2: 31.0, 3: 32.0}[r["seed"]]
    assert exp.claims(worse)[0][1].estimate == pytest.approx(6.0) and exp.claims(worse)[0][2] == "does not hold"
    partial = {**rec, "runs": [r for r in rec["runs"] if r["config"].get("model") != "none" or r["seed"] == 1]}
    # 1 shared seed: no interval, not tested; 2: an interval, still not tested (stats.MIN_SEEDS is 3)
    assert exp.claims(partial)[:2] == rows[:2]
    assert exp.claims(partial)[2:] == [("BN beats the unnormalized net", None, "not tested here"),
                                       ("NF + AGC beats the unnormalized net", None, "not tested here"),
                                       rows[4]]
    two = {**rec, "runs": [r for r in rec["runs"] if r["config"].get("kind") != "final" or r["seed"] != 3]}
    two_rows = exp.claims(two)
    assert all(iv.n == 2 and word == "not tested here" for _, iv, word in two_rows)
    assert two_rows[1][1].low > 0  # NF without AGC trails by 7 and 8 points: clear, but on 2 seeds


def _budget(rec, errors):
    """`rec` with budget-check runs of test errors `errors` {model: {seed: error}} (at the final runs' lr)."""
    rec = copy.deepcopy(rec)
    lr = {r["config"]["model"]: r["metrics"]["lr"] for r in rec["runs"] if r["config"]["kind"] == "final"}
    for model, seeds in errors.items():
        for s, e in seeds.items():
            run = _final(model, s, lr[model], e)
            run["config"]["kind"] = "budget"
            rec["runs"].append(run)
    return rec


def test_budget_readers_give_known_answers():
    # finals: bn 24 25 26, nf 23 23 23, none 35 90 36; with twice the epochs bn -1 -2 -3, nf -3 -3 -3
    rec = _budget(_fake_record(), {"bn": {1: 23.0, 2: 23.0, 3: 23.0}, "nf": {1: 20.0, 2: 20.0, 3: 20.0},
                                   "none": {1: 34.0, 2: 33.0}})
    gain = exp.budget_gain(rec)
    t = t_quantile(0.975, 2)
    assert gain["bn"].estimate == pytest.approx(-2.0) and gain["bn"].n == 3
    assert (gain["bn"].low, gain["bn"].high) == pytest.approx((-2.0 - t / math.sqrt(3), -2.0 + t / math.sqrt(3)))
    assert gain["nf"].estimate == pytest.approx(-3.0) and gain["nf"].low == pytest.approx(-3.0)  # no spread
    assert gain["none"].n == 2 and gain["none"].estimate == pytest.approx((-1 - 57) / 2)
    shift = exp.budget_shift(rec)
    match = shift["NF + AGC matches BN (within ±1)"]
    # nf - bn: short -1 -2 -3, long -3 -3 -3: change -2 -1 0
    assert match["short"].estimate == pytest.approx(-2.0) and match["long"].estimate == pytest.approx(-3.0)
    assert match["change"].estimate == pytest.approx(-1.0) and match["change"].n == 3
    assert match["change"].high == pytest.approx(-1.0 + t / math.sqrt(3))
    bn_none = shift["BN beats the unnormalized net"]  # seeds 1 and 2 only: none has no budget run at seed 3
    assert bn_none["change"].n == 2 and bn_none["short"].estimate == pytest.approx((-11 - 65) / 2)
    assert set(shift) == {"NF + AGC matches BN (within ±1)", "BN beats the unnormalized net",
                          "NF + AGC beats the unnormalized net"}  # no NF-without-AGC runs in this record
    rows = exp.claims(rec, kind="budget")
    assert rows[0][1].estimate == pytest.approx(-3.0) and rows[0][2] == "does not hold"  # 3 below BN: outside ±1
    assert exp.budget_gain(_fake_record()) == {} and exp.budget_shift(_fake_record()) == {}
    lines = exp.findings(rec)
    assert any(line.startswith("Training 60 instead of 10 epochs changed the final test error by BN -2.00 [") for line in lines)
    assert any(line.startswith("What the claims compare moved with the 60-epoch budget by NF + AGC matches BN "
                               "(within ±1): -1.00 [") for line in lines)
    with pytest.raises(ValueError, match="kind must be 'final'.*or 'budget'"):
        exp.final_errors(rec, kind="long")
    wrong = copy.deepcopy(rec)
    next(r for r in wrong["runs"] if r["config"]["kind"] == "budget")["metrics"]["lr"] = 0.3
    with pytest.raises(ValueError, match=r"bn's budget runs trained at lr \[0.3\].*delete the budget runs"):
        exp.chosen_lrs(wrong)


def _spp_run(model, var, sq_mean, res_var, seed=0):
    history = [{"block": i + 1, "avg_var": v, "avg_sq_mean": m, "res_var": 1.0} for i, (v, m) in enumerate(zip(var, sq_mean))]
    return {"config": {"kind": "spp", "model": model, "seed": seed}, "seed": seed, "history": history,
            "metrics": {"blocks": len(history), "mean_res_var": res_var}}


def test_spp_summary_takes_the_median_over_seeds_and_keeps_an_overflow():
    rec = {"config": {}, "runs": [_spp_run("nf", [1.0, 1.5, v], [0.0, 0.0, m], b, seed=s)
                                  for s, (v, m, b) in enumerate([(2.0, 0.2, 0.5), (4.0, 0.2, 0.9), (3.0, 0.6, 0.7)])]
                                 + [_spp_run("none", [0.4, 1.0, v], [0.1, 1.0, v], None, seed=s) for s, v in enumerate([1e6, None, 2e6])]}
    spp = exp.spp_summary(rec)
    nf = spp["nf"]
    assert (nf["n_seeds"], nf["var_last"], nf["sq_mean_last"], nf["branch_var"]) == (3, 3.0, 0.2, 0.7)
    assert nf["mean_shift"] == pytest.approx(0.1)  # median of 0.1, 0.05, 0.2: not sq_mean / var of the medians
    assert nf["range"]["var_last"] == (2.0, 4.0) and nf["range"]["mean_shift"] == pytest.approx((0.05, 0.2))
    none = spp["none"]  # one seed overflowed float32: the median over the other two would hide it
    assert none["var_first"] == 0.4 and math.isnan(none["var_last"]) and all(math.isnan(x) for x in none["range"]["var_last"])
    assert none["n_seeds"] == 3


def test_stage_linearity_tells_linear_growth_from_exponential():
    linear = [1.0 + i for i in range(6)] * 3  # three stages, each a straight line with a reset
    assert exp._stage_linearity(linear) == pytest.approx(1.0)
    exponential = [2.0 ** i for i in range(18)]  # one run-away stream: the late stages bend
    assert exp._stage_linearity(exponential) < 0.95
    assert math.isnan(exp._stage_linearity([1.0, 2.0, 3.0, 4.0, 5.0, math.nan, 7.0, 8.0, 9.0]))
    with pytest.raises(ValueError, match="do not split into 3 stages"):
        exp._stage_linearity([1.0] * 10)


def test_spp_summary_and_findings_give_known_answers():
    rec = _fake_record()
    rec["config"] = {**rec["config"], "spp_depth": 110, "spp_batch": 64}
    rec["runs"] = [_spp_run("bn", [0.5, 2.0, 4.0], [0.0, 0.5, 1.0], 0.7),
                   _spp_run("none", [0.4, 1e6, None], [0.1, 1e6, None], None)] + rec["runs"]
    spp = exp.spp_summary(rec)
    assert spp["bn"] == {"blocks": 3, "var_first": 0.5, "var_last": 4.0, "sq_mean_last": 1.0, "mean_shift": 0.25,
                         "branch_var": 0.7, "n_seeds": 1, "stage_linearity": spp["bn"]["stage_linearity"],
                         "range": {"var_first": (0.5, 0.5), "var_last": (4.0, 4.0), "sq_mean_last": (1.0, 1.0),
                                   "mean_shift": (0.25, 0.25), "branch_var": (0.7, 0.7),
                                   "stage_linearity": spp["bn"]["range"]["stage_linearity"]}}
    assert math.isnan(spp["bn"]["stage_linearity"])  # stages of one block: no line to fit
    assert spp["none"]["var_first"] == 0.4 and math.isnan(spp["none"]["var_last"]) and math.isnan(spp["none"]["mean_shift"])
    lines = exp.findings(rec)
    assert lines[0].startswith("Signal propagation at initialization (ResNet-110, 64 test images, median of 1 seed)")
    assert "BN-ReLU (pre-act) 0.5 and 4; no normalization (pre-act) 0.4 and nan" in lines[0]
    assert lines[1] == ("Chosen lr (lowest validation error of the sweep): BN 0.1; NF + AGC 0.3; no norm 0.01. "
                        "At the end of its grid: NF + AGC (high end); no norm (low end).")
    assert lines[2] == ("Runs that diverged: no norm: sweep at lr 0.03 seed 0 (step 7), final at lr 0.01 seed 2 "
                        "(step 99); the other networks: none.")
    assert lines[3] == ("Mean final test error over seeds, lowest first: NF + AGC 23.00% (sd 0.00, n=3); BN 25.00% "
                        "(sd 1.00, n=3); no norm 53.67% (sd 31.47, n=3, 1 diverged).")
    assert lines[4] == ("AGC clipped 95.0% of the units per step on average over training, and 70.0% in the last epoch "
                        "(NF + AGC final runs, mean over 3 seeds).")
    assert lines[5].startswith("NF + AGC matches BN (within ±1): within noise (difference -2.00 [-4.48, 0.48]")
    assert lines[-1] == ("Largest change of any seed's test error over the last 20% of training (epochs 8 to 10): "
                         "BN 1.00; NF + AGC 0.50; no norm 0.00 points.")
    assert exp.findings({**rec, "config": exp.PROFILES["cpu"]}) == lines[:1]  # a record without an lr sweep
