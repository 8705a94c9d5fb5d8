"""The converged profiles of `prepost_ln` (the lr x warmup x placement grid, the depth study with DeepNorm,
the budget check): their runs, their readers on hand-built records with known answers, and the smoke
variant end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normlab.experiments import prepost_ln as P
from normlab.stats import t_quantile

W = 4  # the fake grid's warmup


def run(study, placement, lr, seed, val, norm="layernorm", depth=2, warmup=W, steps=10, curve=None, diverged=False):
    """A recorded run: `curve` is {step: val_loss} (default: only the final evaluation)."""
    curve = curve or {steps: val}
    config = {"study": study, "placement": placement, "norm": norm, "depth": depth, "lr": lr,
              "warmup_steps": warmup, "seed": seed}
    return {"key": json.dumps(config, sort_keys=True), "config": config, "seed": seed,
            "metrics": {"val_loss": None if diverged else val, "diverged": diverged, "steps": steps},
            "history": [{"step": s, "val_loss": v} for s, v in sorted(curve.items())]}


def record(runs, **config):
    base = {"model": {"d_model": 32, "n_heads": 2, "context": 32}, "batch_size": 8, "val_fraction": 0.1,
            "grid": {"depth": 2, "steps": 10, "warmup_steps": [0, W], "placements": ["post", "pre"],
                     "lines": [{"placement": "pre", "norm": "rmsnorm", "warmup_steps": W}]}}
    return {"experiment": "prepost_ln", "profile": "fake", "config": {**base, **config}, "runs": runs,
            "complete": True}


def grid_record():
    """post: lr 1e-3 fine, 1e-2 diverges at one seed (so 1e-3 is best although its finished seeds are better);
    pre: 1e-2 best. post - pre at warmup 0 is (0.1, 0.2, 0.3) by seed."""
    runs = []
    for seed, (post3, pre2) in enumerate([(2.0, 1.9), (2.1, 1.9), (2.2, 1.9)]):
        for w in (0, W):
            runs.append(run("grid", "post", 1e-3, seed, post3 - (0.05 if w else 0), warmup=w))
            runs.append(run("grid", "post", 1e-2, seed, 1.5, warmup=w, diverged=(seed == 1)))
            runs.append(run("grid", "pre", 1e-3, seed, 2.5, warmup=w))
            runs.append(run("grid", "pre", 1e-2, seed, pre2, warmup=w))
        runs.append(run("grid", "pre", 1e-3, seed, 2.6, norm="rmsnorm"))
        runs.append(run("grid", "pre", 1e-2, seed, 1.9 + 0.01 * seed, norm="rmsnorm"))
    return record(runs)


def test_grid_table_and_best_lrs():
    rec = grid_record()
    rows = {(r["placement"], r["norm"], r["warmup_steps"], r["lr"]): r for r in P.grid_table(rec, stuck_above=3.0)}
    assert len(rows) == 10
    cell = rows[("post", "layernorm", 0, 1e-2)]
    assert (cell["n"], cell["n_diverged"], cell["mean"], cell["values"][1]) == (3, 1, 1.5, None)
    assert rows[("post", "layernorm", 0, 1e-3)]["mean"] == pytest.approx(2.1)
    assert rows[("post", "layernorm", 0, 1e-3)]["sd"] == pytest.approx(0.1)
    assert P.best_lrs(rec) == {("post", "layernorm", 0): 1e-3, ("post", "layernorm", W): 1e-3,
                               ("pre", "layernorm", 0): 1e-2, ("pre", "layernorm", W): 1e-2,
                               ("pre", "rmsnorm", W): 1e-2}


def test_post_minus_pre_at_each_best_lr():
    ivs = P.post_minus_pre(grid_record())
    assert set(ivs) == {0, W}
    half = t_quantile(0.975, 2) * 0.1 / math.sqrt(3)
    assert ivs[0].n == 3 and ivs[0].estimate == pytest.approx(0.2)
    assert (ivs[0].low, ivs[0].high) == pytest.approx((0.2 - half, 0.2 + half))
    assert ivs[W].estimate == pytest.approx(0.15)


def test_rms_minus_ln_at_pre_ln_best_lr():
    iv = P.rms_minus_ln(grid_record())
    assert iv.n == 3 and iv.estimate == pytest.approx(0.01)
    rec = grid_record()
    rec["config"]["grid"]["lines"] = []
    with pytest.raises(ValueError, match="no pre-RMSNorm line"):
        P.rms_minus_ln(rec)


def test_best_lr_is_none_when_every_lr_diverged_and_differences_refuse():
    rec = grid_record()
    for r in rec["runs"]:
        if r["config"]["placement"] == "post" and r["config"]["warmup_steps"] == 0 and r["seed"] == 0:
            r["metrics"].update(diverged=True, val_loss=None)
    assert P.best_lrs(rec)[("post", "layernorm", 0)] is None
    with pytest.raises(ValueError, match=r"at warmup 0 no lr trained \['post'\]"):
        P.post_minus_pre(rec)


def test_paired_refuses_diverged_seeds_and_missing_cells():
    rec = grid_record()
    with pytest.raises(ValueError, match=r"diverged at seeds \[1\]"):
        P._paired(rec, ("post", "layernorm", 2, 1e-2, 0), ("pre", "layernorm", 2, 1e-2, 0))
    with pytest.raises(ValueError, match="not part of the profile"):
        P._paired(rec, ("post", "layernorm", 2, 3e-3, 0), ("pre", "layernorm", 2, 1e-2, 0))
    with pytest.raises(ValueError, match="has no 'depth_study' runs .* cpu_converged_depth"):
        P.depth_table(rec)


def depth_record():
    runs = []
    for seed in range(3):
        for depth, post, pre, deep in ((2, 2.0, 1.9, 1.95), (8, 3.3, 1.8, 1.85)):
            runs.append(run("depth_study", "post", 1e-3, seed, post + 0.01 * seed, depth=depth, diverged=(depth == 8 and seed == 2)))
            runs.append(run("depth_study", "pre", 1e-2, seed, pre, depth=depth))
            runs.append(run("depth_study", "deepnorm", 1e-3, seed, deep, depth=depth))
        runs.append(run("budget", "pre", 1e-2, seed, 1.9 - 0.02 * (seed + 1), steps=20))
    return record(runs)


def test_depth_table_flags_divergence_and_stuck_runs():
    rows = P.depth_table(depth_record(), stuck_above=3.2)
    assert [(r["placement"], r["depth"]) for r in rows] == [("post", 2), ("post", 8), ("pre", 2), ("pre", 8),
                                                            ("deepnorm", 2), ("deepnorm", 8)]
    post8 = rows[1]
    assert (post8["n"], post8["n_diverged"], post8["n_stuck"], post8["lr"]) == (3, 1, 2, 1e-3)
    assert post8["mean"] == pytest.approx(3.305)
    assert rows[3]["n_stuck"] == 0 and rows[3]["mean"] == pytest.approx(1.8)


def test_budget_gain_pairs_longer_runs_with_the_depth_study():
    (placement, iv), = P.budget_gain(depth_record()).items()
    assert placement == "pre" and iv.n == 3 and iv.estimate == pytest.approx(-0.04)


def test_depth_difference_pairs_two_placements_at_each_depth():
    diffs = P.depth_difference(depth_record())  # deepnorm - pre: 0.05 at both depths, every seed
    assert sorted(diffs) == [2, 8] and all(iv.n == 3 and iv.estimate == pytest.approx(0.05) for iv in diffs.values())
    # post at depth 8: 3.30, 3.31 (above the unigram loss, 3.309) and diverged: the last two score the unigram loss
    post = P.depth_difference(depth_record(), "post", "pre")[8]
    assert post.estimate == pytest.approx((3.3 + 2 * P.unigram_loss(0.1)) / 3 - 1.8)
    with pytest.raises(ValueError, match="no 'rms' runs in the depth study"):
        P.depth_difference(depth_record(), "rms")


def test_budget_shift_is_the_change_of_post_minus_pre_with_the_budget():
    runs = []
    for seed in range(3):
        # at the depth study's steps post - pre = 0.1, 0.1, 0.1; with the budget's 0.05, 0.06, 0.07
        runs += [run("depth_study", "post", 1e-3, seed, 2.0), run("depth_study", "pre", 1e-2, seed, 1.9),
                 run("budget", "post", 1e-3, seed, 1.9, steps=20),
                 run("budget", "pre", 1e-2, seed, 1.85 - 0.01 * seed, steps=20)]
    shift = P.budget_shift(record(runs), unigram=3.3)
    assert shift["short"].estimate == pytest.approx(0.1) and shift["short"].n == 3
    assert shift["long"].estimate == pytest.approx(0.06)
    assert shift["change"].estimate == pytest.approx(-0.04) and shift["change"].n == 3
    assert shift["change"].high - shift["change"].low == pytest.approx(2 * t_quantile(0.975, 2) * 0.01 / math.sqrt(3))
    # a seed stuck above the unigram loss counts at it, as in every claim of the chapter
    runs[-2] = run("budget", "post", 1e-3, 2, 3.4, steps=20)
    assert P.budget_shift(record(runs), unigram=3.3)["long"].estimate == pytest.approx((0.05 + 0.06 + 1.47) / 3)
    with pytest.raises(ValueError, match="needs both 'post' and 'pre'"):
        P.budget_shift(depth_record(), unigram=3.3)


def test_flatness_reads_the_last_fifth_of_the_curve():
    runs = [run("grid", "pre", 1e-3, seed, 1.80 - 0.01 * seed, curve={4: 2.5, 8: 1.9 - 0.01 * seed, 10: 1.80 - 0.01 * seed})
            for seed in range(3)]
    runs += [run("grid", "post", 1e-3, seed, 2.0, curve={5: 2.2, 10: 2.0}, diverged=(seed > 0)) for seed in range(2)]
    rows = P.flatness(record(runs))
    post, pre = rows
    assert pre["from_step"] == 8 and pre["n"] == 3 and pre["change"].estimate == pytest.approx(-0.1)
    assert post["n"] == 1 and post["change"] is None  # one finished seed: no interval
    assert P.flatness(record(runs), fraction=0.5)[1]["from_step"] == 4
    with pytest.raises(ValueError, match="smaller eval_every"):
        P.flatness(record(runs), fraction=0.7)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        P.flatness(record(runs), fraction=20)


# ------------------------------------------------------------------------------------- the profiles

def test_converged_profiles_runs():
    grid = [r for r in P.runs(P.PROFILES["cpu_converged"]) if r["study"] == "grid"]
    g = P.PROFILES["cpu_converged"]["grid"]
    n_lines = len(g["placements"]) * len(g["warmup_steps"]) + len(g["lines"])
    n_seeds = sum(len(g["seeds"]) + (len(g["more_seeds"]["seeds"]) if lr in g["more_seeds"]["lrs"] else 0)
                  for lr in g["lrs"])
    assert len(grid) == n_lines * n_seeds
    assert len({json.dumps(r, sort_keys=True) for r in grid}) == len(grid)
    assert {r["placement"] for r in grid} == {"post", "pre", "deepnorm"}
    grad = [r for r in P.runs(P.PROFILES["cpu_converged"]) if r["study"] == "grad_at_init"]
    assert {r["placement"] for r in grad} == {"post", "pre", "deepnorm"} and len({r["seed"] for r in grad}) == 5
    # the other profiles are what they were
    assert len(P.runs(P.PROFILES["cpu"])) == 44 and {r["study"] for r in P.runs(P.PROFILES["cpu"])} == {
        "grad_at_init", "train", "depth"}


def test_depth_profile_takes_each_placements_lr_from_the_recorded_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    config = P.PROFILES["cpu_converged_depth"]
    with pytest.raises(ValueError, match="does not exist: record it first: `python -m normlab run prepost_ln "
                                         "--profile cpu_converged`"):
        P.runs(config)
    path = tmp_path / "prepost_ln" / "cpu_converged.json"
    path.parent.mkdir()
    g = P.PROFILES["cpu_converged"]
    w = config["depth_study"]["warmup_steps"]
    runs = [run("grid", p, lr, 0, val, warmup=w, depth=6) for p, lr, val in
            [("post", 1e-3, 1.9), ("post", 3e-3, 2.0), ("pre", 1e-3, 1.9), ("pre", 3e-3, 1.8),
             ("deepnorm", 1e-3, 1.9), ("deepnorm", 3e-3, 1.85)]]
    fake = {"experiment": "prepost_ln", "profile": "cpu_converged", "runs": runs, "complete": True,
            "config": {k: g[k] for k in ("model", "batch_size", "val_fraction", "grid")}}
    path.write_text(json.dumps({**fake, "complete": False}))
    with pytest.raises(ValueError, match="still being recorded"):
        P.runs(config)
    path.write_text(json.dumps(fake))
    assert P.depth_lrs(config) == {"post": 1e-3, "pre": 3e-3, "deepnorm": 3e-3}
    out = P.runs(config)
    d, b = config["depth_study"], config["budget"]
    study = [r for r in out if r["study"] == "depth_study"]
    assert len(study) == len(d["depths"]) * len(d["placements"]) * len(d["seeds"])
    assert {(r["placement"], r["lr"]) for r in out} == {("post", 1e-3), ("pre", 3e-3), ("deepnorm", 3e-3)}
    budget = [r for r in out if r["study"] == "budget"]
    assert len(budget) == len(b["placements"]) * len(b["seeds"]) and {r["steps"] for r in budget} == {b["steps"]}
    fake["config"]["model"] = {**g["model"], "d_model": 128}
    path.write_text(json.dumps(fake))
    with pytest.raises(ValueError, match="recorded with model="):
        P.runs(config)


@pytest.mark.parametrize("change,match", [
    ({"lr_from": "cpu_converged"}, "exactly one of 'lr'"),
    ({"lr": {"post": 1e-3}}, r"no lr for \['pre', 'deepnorm'\]"),
])
def test_depth_study_lr_errors(change, match):
    smoke = P.PROFILES["smoke_converged"]
    with pytest.raises(ValueError, match=match):
        P.runs({**smoke, "depth_study": {**smoke["depth_study"], **change}})


def test_budget_needs_a_depth_study_at_its_depth():
    config = {**P.PROFILES["smoke_converged"], "budget": {**P.PROFILES["smoke_converged"]["budget"], "depth": 5}}
    with pytest.raises(ValueError, match="not among the depth study's depths"):
        P.runs(config)
    config = {k: v for k, v in P.PROFILES["smoke_converged"].items() if k != "depth_study"}
    with pytest.raises(ValueError, match="needs a depth_study"):
        P.runs(config)


def test_run_one_refuses_a_study_the_config_lacks():
    r = next(r for r in P.runs(P.PROFILES["smoke_converged"]) if r["study"] == "budget")
    with pytest.raises(ValueError, match="does not have"):
        P.run_one(r, P.PROFILES["smoke"], torch.device("cpu"))


def test_smoke_converged_end_to_end(tmp_path):
    """The whole smoke variant through the sweep, every reader on it, and run_one deterministic for the new
    code paths (a DeepNorm depth-study run, a budget run with its own step count)."""
    from normlab.sweep import sweep

    config = P.PROFILES["smoke_converged"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = sweep("prepost_ln", "smoke_converged", out=tmp_path / "s.json", device="cpu", progress=False, log=None)
        assert rec["complete"] and len(rec["runs"]) == len(P.runs(config))
        deep = next(r for r in P.runs(config) if r["study"] == "depth_study" and r["placement"] == "deepnorm")
        budget = next(r for r in P.runs(config) if r["study"] == "budget")
        for r in (deep, budget):
            a, b = (P.run_one(r, config, torch.device("cpu")) for _ in range(2))
            strip = lambda res: (res["metrics"], [{k: v for k, v in h.items() if k != "time_s"}  # noqa: E731
                                                  for h in res["history"]])
            assert strip(a) == strip(b)
        assert a["metrics"]["steps"] == config["budget"]["steps"]
    finally:
        torch.set_num_threads(threads)
    grads = [r for r in rec["runs"] if r["config"]["study"] == "grad_at_init" and r["config"]["placement"] == "deepnorm"]
    assert grads and all(v > 0 for r in grads for v in r["metrics"]["grad_norm_by_layer"])
    table = P.grid_table(rec)
    assert {(r["placement"], r["norm"]) for r in table} == {("post", "layernorm"), ("pre", "layernorm"),
                                                             ("pre", "rmsnorm"), ("deepnorm", "layernorm")}
    assert {r["n"] for r in table if r["lr"] == 1e-3} == {3} and {r["n"] for r in table if r["lr"] == 1e-2} == {2}
    best = P.best_lrs(rec)
    assert all(lr in config["grid"]["lrs"] for lr in best.values() if lr is not None)
    for iv in (*P.post_minus_pre(rec).values(), P.rms_minus_ln(rec), *P.budget_gain(rec).values()):
        assert math.isfinite(iv.estimate) and iv.low <= iv.estimate <= iv.high
    rows = P.depth_table(rec)
    assert len(rows) == 6 and all(r["n"] == 2 for r in rows)
    assert {r["lr"] for r in rows if r["placement"] == "pre"} == {config["depth_study"]["lr"]["pre"]}
    flat = P.flatness(rec)
    assert all(r["from_step"] == 9 for r in flat if r["n"])
    # the chapter's readers, on the one smoke record that stands for both converged records
    from normlab.stats import VERDICTS, verdict_table

    rows = P.claims(rec, rec)
    assert len(rows) == 9 and all(word in VERDICTS for _, _, word in rows)
    assert verdict_table(rows, width=None).count("\n") == len(rows)
    assert set(P.depth_lrs_used(rec, rec)) == {"post", "pre", "deepnorm"}
    assert [r["placement"] for r in P.grad_profiles(rec)] == ["post", "pre", "deepnorm"]
    for cell in P.best_cells(rec).values():
        assert P.mean_curve(rec, cell)["step"][-1] == config["grid"]["steps"]


def test_cost_estimate_known_answer():
    """smoke_converged at 1000 tokens/s: 42 runs of 12 steps and 4 of 24, batch 8 x context 32 = 256 tokens a
    step, 4 evaluations a run of 64 windows x 32 tokens at a third of the cost."""
    est = P.cost_estimate(P.PROFILES["smoke_converged"], {2: 1000.0, 3: 1000.0})
    assert est["runs"] == 46 and est["tokens"] == 42 * 12 * 256 + 4 * 24 * 256
    seconds = (42 * (12 * 256 + 4 * 64 * 32 / 3) + 4 * (24 * 256 + 4 * 64 * 32 / 3)) / 1000
    assert est["cpu_hours"] == pytest.approx(seconds / 3600)
    # a depth study that reads its lrs from a recorded grid is costed without reading it
    assert P.cost_estimate(P.PROFILES["cpu_converged_depth"], {6: 1.0, 12: 1.0, 24: 1.0})["runs"] == 33
    with pytest.raises(ValueError, match=r"no throughput for depths \[3\]: measure them"):
        P.cost_estimate(P.PROFILES["smoke_converged"], {2: 1000.0})


def test_measure_tokens_per_s_runs():
    assert P.measure_tokens_per_s(P.PROFILES["smoke_converged"], depth=2, steps=3, skip=1) > 0


# ------------------------------------------------------------------ the chapter's readers and its claims

U = 3.3  # the unigram loss the claims tests pass in (the real one is P.unigram_loss(), ~3.31)


def grad_run(placement, depth, seed, layers):
    config = {"study": "grad_at_init", "placement": placement, "norm": "layernorm", "depth": depth, "seed": seed}
    return {"key": json.dumps(config, sort_keys=True), "config": config, "seed": seed,
            "metrics": {"grad_norm_by_layer": layers, "last_over_first": layers[-1] / layers[0]}, "history": []}


def claims_grid():
    """Seeds 0-2. No warmup: post-LN stuck above the unigram loss at lr 1e-2 (scores U), fine at 1e-3 (2.0);
    pre-LN best at 1e-2 (1.8 + 0.01 s) with or without warmup. Warmup W: post-LN best at 1e-2 (1.7 + 0.02 s).
    pre-RMSNorm 0.005 above pre-LN. Gradients at init, depth 4: post's last/first 2 + 0.1 s, pre's 0.5."""
    runs = []
    for s in range(3):
        runs += [grad_run("post", 4, s, [1.0, 1.0, 1.0, 2.0 + 0.1 * s]), grad_run("pre", 4, s, [1.0, 0.8, 0.6, 0.5])]
        runs += [run("grid", "post", 1e-3, s, 2.0, warmup=0), run("grid", "post", 1e-2, s, 3.5, warmup=0),
                 run("grid", "post", 1e-3, s, 1.9), run("grid", "post", 1e-2, s, 1.7 + 0.02 * s)]
        for w in (0, W):
            runs += [run("grid", "pre", 1e-3, s, 2.2, warmup=w), run("grid", "pre", 1e-2, s, 1.8 + 0.01 * s, warmup=w)]
        runs += [run("grid", "pre", 1e-3, s, 2.3, norm="rmsnorm"),
                 run("grid", "pre", 1e-2, s, 1.805 + 0.01 * s, norm="rmsnorm")]
    return record(runs)


def claims_depth(placements=("post", "pre", "deepnorm"), **study):
    """Depth 8: post-LN diverged at seed 0, stuck at seed 1 (3.4), 3.0 at seed 2 (gains 0, 0, 0.3); pre-LN
    1.8 + 0.05 s (gains 1.5, 1.45, 1.4); DeepNorm diverged at every seed. Depth 2: everyone trains."""
    finals = {"post": [None, 3.4, 3.0], "pre": [1.8, 1.85, 1.9], "deepnorm": [None, None, None]}
    runs = []
    for p in placements:
        for s in range(3):
            runs.append(run("depth_study", p, 1e-2, s, 2.0, depth=2))
            runs.append(run("depth_study", p, 1e-2, s, finals[p][s], depth=8, diverged=finals[p][s] is None))
    return record(runs, depth_study={"depths": [2, 8], "placements": list(placements), "warmup_steps": W, **study})


def test_claims_known_answers():
    rows = P.claims(claims_grid(), claims_depth(), unigram=U)
    got = {text: (iv, word) for text, iv, word in rows}
    assert [text for text, _, _ in rows] == [
        "at init (depth 4), post-LN's W2 gradient rises more toward the output (Xiong)",
        "post-LN needs warmup: worse without it, at its best lr with it (Xiong)",
        "pre-LN trains without warmup where post-LN does not (Xiong)",
        "pre-LN needs no warmup: best without = best with ±0.02 (Xiong)",
        "with warmup, post-LN beats pre-LN, each at its best lr (Liu)",
        "pre-RMSNorm matches pre-LayerNorm ±0.02 (Zhang & Sennrich)",
        "post-LN fails at depth 8 (Liu)", "pre-LN trains at depth 8 (Liu)", "DeepNorm trains at depth 8 (Wang)"]
    half = lambda sd: t_quantile(0.975, 2) * sd / math.sqrt(3)  # noqa: E731
    expected = [  # (estimate, sd of the paired differences, verdict)
        (1.6, 0.1, "holds"),                 # post 2 + 0.1 s minus pre 0.5
        (1.58, 0.02, "holds"),               # post without warmup scores U at lr 1e-2: U - (1.7 + 0.02 s)
        (1.49, 0.01, "holds"),               # U - (1.8 + 0.01 s) at pre-LN's best lr without warmup
        (0.0, 0.0, "holds"),                 # pre-LN the same with and without warmup
        (-0.09, 0.01, "holds"),              # (1.7 + 0.02 s) - (1.8 + 0.01 s)
        (0.005, 0.0, "holds"),
        (0.1, math.sqrt(0.03), "within noise"),  # gains 0, 0, 0.3: high 0.53 > 0.5
        (1.45, 0.05, "holds"),
        (0.0, 0.0, "does not hold"),         # every seed diverged: gains 0
    ]
    for (text, iv, word), (est, sd, verdict) in zip(rows, expected):
        assert iv.n == 3 and iv.estimate == pytest.approx(est, abs=1e-9), text
        assert (iv.low, iv.high) == pytest.approx((est - half(sd), est + half(sd)), abs=1e-9), text
        assert word == verdict, text
    # the same cells read by the readers the chapter prints: identical intervals when nothing failed
    assert got["with warmup, post-LN beats pre-LN, each at its best lr (Liu)"][0] == P.post_minus_pre(claims_grid())[W]
    assert got["pre-RMSNorm matches pre-LayerNorm ±0.02 (Zhang & Sennrich)"][0] == P.rms_minus_ln(claims_grid())


def test_claims_not_tested_and_left_out():
    grid = claims_grid()
    for r in grid["runs"]:  # post-LN with warmup diverges at seed 2 of every lr: no best lr
        if r["config"]["study"] == "grid" and r["config"]["placement"] == "post" and r["config"]["warmup_steps"] == W \
                and r["seed"] == 2:
            r["metrics"].update(diverged=True, val_loss=None)
    grid["config"]["grid"]["lines"] = []
    grid["runs"] = [r for r in grid["runs"] if r["config"]["study"] != "grad_at_init"]
    rows = P.claims(grid, claims_depth(("post", "pre")), unigram=U, margin=0.1)
    words = {text: (iv, word) for text, iv, word in rows}
    assert words["post-LN needs warmup: worse without it, at its best lr with it (Xiong)"] == (None, "not tested here")
    assert words["with warmup, post-LN beats pre-LN, each at its best lr (Liu)"] == (None, "not tested here")
    assert "pre-LN needs no warmup: best without = best with ±0.1 (Xiong)" in words
    assert not any("RMSNorm" in t or "DeepNorm" in t or "at init" in t for t in words)
    assert len(rows) == 6


def test_scored_differences_count_a_failed_seed_at_the_unigram_loss():
    rec = grid_record()  # post-LN at lr 1e-2 diverged at seed 1; finished seeds at 1.5, pre-LN at 1.9
    iv = P._paired(rec, ("post", "layernorm", 2, 1e-2, 0), ("pre", "layernorm", 2, 1e-2, 0), scored=True, unigram=3.0)
    assert iv.estimate == pytest.approx((-0.4 + 1.1 - 0.4) / 3)
    assert P.scored_loss(run("grid", "pre", 1e-3, 0, 3.5), 3.3) == 3.3
    assert P.scored_loss(run("grid", "pre", 1e-3, 0, 2.5), 3.3) == 2.5


def test_best_cell_and_best_cells():
    rec = claims_grid()
    cell = P.best_cell(rec, target=1.85)
    # pre-LN's 1e-2 cells tie with and without warmup: the shorter warmup wins
    assert (cell["lr"], cell["warmup_steps"], cell["median"], cell["max"], cell["meets"]) == (1e-2, 0, 1.81, 1.82, True)
    assert P.best_cell(rec)["meets"] is False  # 1.82 > TARGET_LOSS = 1.8
    assert P.best_cell(rec, "post")["lr"] == 1e-2 and P.best_cell(rec, "post")["warmup_steps"] == W
    assert P.best_cells(rec) == {("post", "layernorm", 0): ("post", "layernorm", 2, 1e-3, 0),
                                 ("post", "layernorm", W): ("post", "layernorm", 2, 1e-2, W),
                                 ("pre", "layernorm", 0): ("pre", "layernorm", 2, 1e-2, 0),
                                 ("pre", "layernorm", W): ("pre", "layernorm", 2, 1e-2, W),
                                 ("pre", "rmsnorm", W): ("pre", "rmsnorm", 2, 1e-2, W)}
    with pytest.raises(ValueError, match="no deepnorm-LN"):
        P.best_cell(rec, "deepnorm")


def test_mean_curve_over_finished_seeds():
    runs = [run("grid", "pre", 1e-3, 0, 2.0, curve={5: 3.0, 10: 2.0}),
            run("grid", "pre", 1e-3, 1, 2.2, curve={5: 3.2, 8: 2.5, 10: 2.2}),
            run("grid", "pre", 1e-3, 2, 2.0, curve={5: 9.0, 10: 9.0}, diverged=True)]
    curve = P.mean_curve(record(runs), ("pre", "layernorm", 2, 1e-3, W))
    assert curve["n"] == 2 and curve["step"] == [5, 10]
    assert curve["mean"] == pytest.approx([3.1, 2.1]) and curve["min"] == [3.0, 2.0] and curve["max"] == [3.2, 2.2]
    with pytest.raises(ValueError, match="not part of the profile"):
        P.mean_curve(record(runs), ("pre", "layernorm", 2, 1e-2, W))


def test_grad_profiles_and_ratio_difference():
    rows = P.grad_profiles(claims_grid())
    assert [(r["depth"], r["placement"], r["n"]) for r in rows] == [(4, "post", 3), (4, "pre", 3)]
    post = rows[0]
    assert post["mean"] == pytest.approx([1.0, 1.0, 1.0, 2.1]) and post["ratio"] == pytest.approx(2.1)
    assert post["seed_ratios"] == pytest.approx({0: 2.0, 1: 2.1, 2: 2.2})
    assert post["sd"][-1] == pytest.approx(math.sqrt(0.02 / 3)) and post["layer_mean"] == pytest.approx(5.1 / 4)
    assert P.grad_ratio_difference(claims_grid(), 4).estimate == pytest.approx(1.6)
    with pytest.raises(ValueError, match=r"no gradients at init of \['deepnorm'\] at depth 4"):
        P.grad_ratio_difference(claims_grid(), 4, "deepnorm")
    with pytest.raises(ValueError, match="has no grad_at_init runs"):
        P.grad_profiles(grid_record())


def test_context_gain():
    iv = P.context_gain(claims_depth(), ("pre", "layernorm", 8, 1e-2, W), unigram=U)
    assert iv.n == 3 and iv.estimate == pytest.approx(1.45)


def test_depth_lrs_used_checks_the_grid_it_came_from():
    grid, depth = claims_grid(), claims_depth()
    assert P.depth_lrs_used(grid, depth) == {"post": {"lr": 1e-2, "grid_best": 1e-2},
                                             "pre": {"lr": 1e-2, "grid_best": 1e-2},
                                             "deepnorm": {"lr": 1e-2, "grid_best": None}}
    with pytest.raises(ValueError, match=r"lrs of \['deepnorm'\] are not the best lrs of this grid record"):
        P.depth_lrs_used(grid, claims_depth(lr_from="cpu_converged"))
    assert P.depth_lrs_used(grid, claims_depth(("post", "pre"), lr_from="cpu_converged"))["pre"]["lr"] == 1e-2
