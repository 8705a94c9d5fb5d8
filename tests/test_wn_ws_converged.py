"""Chapter 05's per-variant-lr profiles of `wn_ws_training`: config checks, the lr sweep feeding the final
runs, the readers on hand-built records with known answers, and the smoke profile end to end."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from normlab import results, stats, sweep
from normlab.experiments import wn_ws_training as w

SMOKE = w.PROFILES["smoke_converged"]


# ------------------------------------------------------------------------------------------------
# a hand-built record: two variants (bn, ws_gn) plus plain, every number chosen
# ------------------------------------------------------------------------------------------------


def _run(phase, variant, seed, lr=None, test=None, val=None, diverged=False, history=None):
    config = {"phase": phase, "variant": variant, "seed": seed, **({"lr": lr} if phase == "sweep" else {})}
    metrics = {"test_error": test, "val_error": val, "diverged": diverged, "lr": lr}
    return {"key": results.run_key(config), "config": config, "seed": seed, "metrics": metrics,
            "history": history or []}


def _curve(end, drop):
    """Five epochs whose test error falls by `drop` from epoch 4 to epoch 5, ending at `end`."""
    return [{"epoch": e, "test_error": end + drop + (5 - e)} for e in (1, 2, 3)] + \
        [{"epoch": 4, "test_error": end + drop}, {"epoch": 5, "test_error": end}]


def fake_record():
    config = {**SMOKE, "variants": ["plain", "ws", "ws_gn", "bn"], "epochs": 5, "margin": 0.5, "trains_below": 50.0,
              "lr_grid": {"plain": [0.01, 0.1], "ws": [1e-4, 1e-3], "ws_gn": [0.03, 0.1, 0.3], "bn": [0.1, 0.3, 1.0]},
              "sweep_seeds": [100], "seeds": {"plain": [0, 1, 2], "ws": [0, 1], "ws_gn": [0, 1, 2], "bn": [0, 1, 2]}}
    sweep_runs = [
        _run("sweep", "plain", 100, 0.01, val=12.0), _run("sweep", "plain", 100, 0.1, val=11.0),  # 0.1, at the top
        _run("sweep", "ws", 100, 1e-4, val=89.9), _run("sweep", "ws", 100, 1e-3, val=90.0),       # never trains
        # ws_gn: 0.3 has the lowest val error but diverged; 0.03 and 0.1 tie: the smaller wins
        _run("sweep", "ws_gn", 100, 0.03, val=10.0), _run("sweep", "ws_gn", 100, 0.1, val=10.0),
        _run("sweep", "ws_gn", 100, 0.3, val=5.0, diverged=True),
        _run("sweep", "bn", 100, 0.1, val=10.5), _run("sweep", "bn", 100, 0.3, val=9.5),
        _run("sweep", "bn", 100, 1.0, val=9.9),
    ]
    bn = {0: 10.0, 1: 10.4, 2: 9.8}
    ws_gn = {s: e + 0.2 + 0.1 * (s - 1) for s, e in bn.items()}  # ws_gn - bn = 0.1, 0.2, 0.3: mean 0.2
    plain = {s: e + 2.0 for s, e in bn.items()}                    # plain - bn = 2.0 for every seed
    final_runs = [_run("final", "bn", s, 0.3, test=e, history=_curve(e, 0.1)) for s, e in bn.items()]
    final_runs += [_run("final", "ws_gn", s, 0.03, test=e, history=_curve(e, 0.5)) for s, e in ws_gn.items()]
    final_runs += [_run("final", "plain", s, 0.1, test=e, history=_curve(e, 0.0)) for s, e in plain.items()]
    final_runs += [_run("final", "ws", s, 1e-4, test=90.0, history=_curve(90.0, 0.0)) for s in (0, 1)]
    return {"experiment": "wn_ws_training", "profile": "fake", "config": config, "runs": sweep_runs + final_runs}


def test_chosen_lrs_skip_diverged_break_ties_low_and_flag_edges():
    chosen = w.chosen_lrs(fake_record())
    assert {v: c["lr"] for v, c in chosen.items()} == {"plain": 0.1, "ws": 1e-4, "ws_gn": 0.03, "bn": 0.3}
    assert chosen["plain"]["at_edge"] == "high" and chosen["ws"]["at_edge"] == "low"
    assert chosen["ws_gn"]["at_edge"] == "low" and chosen["bn"]["at_edge"] is None
    assert chosen["bn"]["val_error"] == 9.5


def test_sweep_table_rows():
    rows = w.sweep_table(fake_record())
    assert len(rows) == 10
    row = next(r for r in rows if r["variant"] == "ws_gn" and r["lr"] == 0.3)
    assert row == {"variant": "ws_gn", "lr": 0.3, "val_error": None, "n": 1, "diverged": 1, "chosen": False}
    assert [r["lr"] for r in rows if r["chosen"]] == [0.1, 1e-4, 0.03, 0.3]


def test_test_errors_and_seed_spread():
    t = w.test_errors(fake_record())
    assert t["bn"]["lr"] == 0.3 and t["bn"]["n"] == 3 and t["bn"]["by_seed"] == {0: 10.0, 1: 10.4, 2: 9.8}
    assert t["bn"]["mean"] == pytest.approx(10.0666666, abs=1e-6)
    assert t["bn"]["sd"] == pytest.approx(0.305505, abs=1e-6)
    assert (t["bn"]["min"], t["bn"]["max"], t["bn"]["diverged"]) == (9.8, 10.4, 0)


def test_difference_is_paired_by_seed():
    iv = w.difference(fake_record(), "ws_gn", "bn")
    assert iv.n == 3 and iv.estimate == pytest.approx(0.2)
    half = stats.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # the differences 0.1, 0.2, 0.3 have sd 0.1
    assert (iv.low, iv.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    same = w.difference(fake_record(), "plain", "bn")
    assert (same.estimate, same.low, same.high) == (pytest.approx(2.0),) * 3  # a constant gap has no spread
    assert w.difference(fake_record(), "ws", "plain").n == 2  # only the seeds both variants have


def test_claims_and_their_verdicts():
    rows = {text: (iv, word) for text, iv, word in w.claims(fake_record())}
    assert set(rows) == {"WS + GN matches BN (within ±0.5)", "BN beats plain", "WS alone, at its own lr, trails plain"}
    # 0.2 [-0.05, 0.45] lies inside (-0.5, 0.5): equivalent; BN is 2 points better than plain for every seed
    assert rows["WS + GN matches BN (within ±0.5)"][1] == stats.HOLDS
    assert rows["BN beats plain"][1] == stats.HOLDS
    # WS has 2 final seeds: the interval is shown, but the book's verdicts need 3 (stats.MIN_SEEDS)
    ws_iv, ws_word = rows["WS alone, at its own lr, trails plain"]
    assert ws_iv.n == 2 and ws_iv.low > 0 and ws_word == stats.NOT_TESTED
    # a margin narrower than the interval's upper end: within noise
    narrow = {text: word for text, _, word in w.claims(fake_record(), margin=0.3)}
    assert narrow["WS + GN matches BN (within ±0.3)"] == stats.WITHIN_NOISE
    print(stats.verdict_table(w.claims(fake_record())))  # renders
    one = fake_record()  # WS with 1 final seed: no interval yet, and no verdict
    one["runs"] = [r for r in one["runs"] if not (r["config"] == {"phase": "final", "variant": "ws", "seed": 1})]
    rows_one = {text: (iv, word) for text, iv, word in w.claims(one)}
    assert rows_one["WS alone, at its own lr, trails plain"] == (None, stats.NOT_TESTED)
    assert "WS alone, at its own lr, trails plain: not tested here (fewer than 2 shared seeds recorded so far)." \
        in w.findings(one)


def test_trains_at_any_lr():
    ws = w.trains_at_any_lr(fake_record(), "ws")
    assert ws == {"trains": False, "lrs": [], "best_lr": None, "best_val_error": None, "grid": [1e-4, 1e-3],
                  "verdict": stats.DOES_NOT_HOLD}
    plain = w.trains_at_any_lr(fake_record(), "plain")
    assert plain["trains"] and plain["lrs"] == [0.01, 0.1] and plain["best_lr"] == 0.1
    assert plain["verdict"] == stats.HOLDS
    assert w.trains_at_any_lr(fake_record(), "ws", below=89.95)["lrs"] == [1e-4]


def test_flatness_over_the_last_fifth():
    f = w.flatness(fake_record())
    assert (f["bn"]["from_epoch"], f["bn"]["to_epoch"], f["bn"]["n"]) == (4, 5, 3)
    assert f["bn"]["change"] == pytest.approx(-0.1) and f["bn"]["flat"]
    assert f["ws_gn"]["max_abs_change"] == pytest.approx(0.5) and not f["ws_gn"]["flat"]
    assert w.flatness(fake_record(), fraction=0.4)["plain"]["from_epoch"] == 3
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        w.flatness(fake_record(), fraction=1.0)


def test_curves_mean_and_range_over_finished_seeds():
    c = w.curves(fake_record())
    assert set(c) == {"plain", "ws", "ws_gn", "bn"}
    bn = c["bn"]  # _curve(end, 0.1): end + 0.1 + (5 - e) for epochs 1-3, end + 0.1 at 4, end at 5
    assert bn["epoch"] == [1, 2, 3, 4, 5] and bn["n"] == 3
    assert bn["mean"][-1] == pytest.approx(10.0666666, abs=1e-6) and bn["mean"][0] == pytest.approx(14.1666666, abs=1e-6)
    assert (bn["min"][-1], bn["max"][-1]) == (9.8, 10.4)
    assert (bn["min"][3], bn["max"][3]) == (pytest.approx(9.9), pytest.approx(10.5))
    record = fake_record()
    bn0 = next(r for r in record["runs"] if r["config"] == {"phase": "final", "variant": "bn", "seed": 0})
    bn0["metrics"]["diverged"] = True                       # a diverged seed is left out
    bn1 = next(r for r in record["runs"] if r["config"] == {"phase": "final", "variant": "bn", "seed": 1})
    bn1["history"] = bn1["history"][:3]                     # so is one that stopped before the last epoch
    c = w.curves(record)
    assert c["bn"]["n"] == 1 and c["bn"]["mean"][-1] == 9.8 and c["bn"]["min"] == c["bn"]["max"] == c["bn"]["mean"]
    assert w.flatness(record)["bn"]["n"] == 1
    for r in record["runs"]:
        if r["config"] == {"phase": "final", "variant": "bn", "seed": 2}:
            r["metrics"]["diverged"] = True
    assert "bn" not in w.curves(record) and "bn" not in w.flatness(record)


def test_findings_are_the_readers_in_words():
    lines = w.findings(fake_record())
    assert lines[0] == ("Chosen lr: plain 0.1, WS 0.0001, WS + GN 0.03, BN 0.3; at the end of its grid: "
                        "plain (high end), WS (low end), WS + GN (low end).")
    assert lines[1] == ("Mean test error over seeds, lowest first: BN 10.07% (n=3), WS + GN 10.27% (n=3), "
                        "plain 12.07% (n=3), WS 90.00% (n=2).")
    claim_lines = lines[2:5]
    assert [line.split(":")[0] for line in claim_lines] == [text for text, _, _ in w.claims(fake_record())]
    assert claim_lines[0] == ("WS + GN matches BN (within ±0.5): holds "
                              f"(difference {w.difference(fake_record(), 'ws_gn', 'bn').format(2)} points of test "
                              "error, n=3).")
    assert lines[5] == ("WS alone trains (median validation error below 50%) at some lr of its grid "
                        "(lr 0.0001 to 0.001): does not hold.")
    assert lines[6] == ("Over the last 20% of training (epochs 4 to 5) the test error of some seed moved by more "
                        "than 0.25 points: WS + GN (0.50).")
    assert len(lines) == 7
    assert w.findings(fake_record(), tol=0.5)[6].endswith("every seed moved by at most 0.5 points.")
    record = fake_record()  # WS trains at 1e-4 now: its lrs and the best one are named
    for r in record["runs"]:
        if r["config"] == {"phase": "sweep", "variant": "ws", "lr": 1e-4, "seed": 100}:
            r["metrics"]["val_error"] = 20.0
    assert w.findings(record)[5].endswith(": holds; at 0.0001, best 0.0001 with 20.00% validation error.")
    sweep_only = fake_record()
    sweep_only["runs"] = [r for r in sweep_only["runs"] if r["config"]["phase"] == "sweep"]
    assert len(w.findings(sweep_only)) == 2  # the chosen lrs and WS alone: nothing of the final runs yet


def test_readers_refuse_what_they_cannot_read():
    old = {"profile": "cpu", "config": w.PROFILES["cpu"], "runs": []}
    with pytest.raises(ValueError, match="per-variant-lr profile"):
        w.chosen_lrs(old)
    with pytest.raises(ValueError, match="unknown variant 'gn'"):
        w.difference(fake_record(), "gn")
    record = fake_record()
    record["runs"] = [r for r in record["runs"] if r["config"] != {**r["config"], "phase": "final", "variant": "bn"}]
    with pytest.raises(ValueError, match="no final runs of 'bn'"):
        w.difference(record, "ws_gn", "bn")
    stale = fake_record()
    bn1 = next(r for r in stale["runs"] if r["config"] == {"phase": "final", "variant": "bn", "seed": 1})
    bn1["metrics"]["lr"] = 1.0
    with pytest.raises(ValueError, match="used another lr than the recorded sweep's 0.3"):
        w.test_errors(stale)
    diverged = fake_record()
    for r in diverged["runs"]:
        if r["config"]["phase"] == "sweep" and r["config"]["variant"] == "bn":
            r["metrics"]["diverged"] = True
    with pytest.raises(ValueError, match=r"smaller learning rates: lr_grid\['bn'\]"):
        w.chosen_lrs(diverged)
    one_seed = fake_record()
    one_seed["runs"] = [r for r in one_seed["runs"] if not (r["config"]["variant"] == "ws" and r["seed"] == 1)]
    with pytest.raises(ValueError, match="share 1 final seeds"):
        w.difference(one_seed, "ws", "plain")


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


def test_converged_profiles_runs_sweep_first_then_finals():
    for name in ("smoke_converged", "cpu_converged"):
        config = w.PROFILES[name]
        json.dumps(config)
        rs = w.runs(config)
        n_sweep = sum(len(config["lr_grid"][v]) for v in config["variants"]) * len(config["sweep_seeds"])
        n_final = sum(len(config["seeds"][v]) for v in config["variants"])
        assert len(rs) == n_sweep + n_final and len({results.run_key(r) for r in rs}) == len(rs)
        assert [r["phase"] for r in rs] == ["sweep"] * n_sweep + ["final"] * n_final
        assert all("lr" not in r for r in rs[n_sweep:]), "a final run's lr comes from the sweep"
    cpu = w.PROFILES["cpu_converged"]
    assert cpu["variants"] == list(w.VARIANTS)
    assert len(cpu["seeds"]["ws_gn"]) >= 5 and len(cpu["seeds"]["bn"]) >= 5
    assert all(len(s) >= 3 for s in cpu["seeds"].values())
    assert min(cpu["lr_grid"]["ws"]) <= 1e-4 < 0.05 <= max(cpu["lr_grid"]["ws"])  # WS alone below the chapter's lr


@pytest.mark.parametrize("change, match", [
    ({"lr_grid": {"plain": [0.1]}}, r"add lr_grid\['wn'\]"),
    ({"lr_grid": {**SMOKE["lr_grid"], "bn": [0.1, -1.0]}}, "positive finite"),
    ({"seeds": {**SMOKE["seeds"], "bn": [0]}}, "at least 2 distinct seeds"),
    ({"seeds": {**SMOKE["seeds"], "bn": [0, 100]}, "sweep_seeds": [100]}, "disjoint seeds"),
    ({"sweep_seeds": []}, "sweep_seeds is empty"),
    ({"variants": ["bn", "layernorm"]}, "may only contain"),
    ({"margin": 0}, "margin must be a positive"),
    ({"epochs": 0}, "epochs must be an integer"),
])
def test_bad_configs_name_the_fix(change, match):
    with pytest.raises(ValueError, match=match):
        w.runs({**SMOKE, **change})


def test_a_final_run_needs_its_sweep(tmp_path):
    final = {"phase": "final", "variant": "bn", "seed": 0}
    with pytest.raises(ValueError, match="takes its lr from the recorded lr sweep"):
        w.run_one(final, SMOKE)
    from normlab.experiments import NotReady

    with pytest.raises(NotReady, match="lacks .* sweep runs of 'bn'"):
        w.run_one(final, SMOKE, record={"runs": []})
    with pytest.raises(ValueError, match="not a run of this profile"):
        w.run_one({"variant": "bn", "seed": 0}, SMOKE)
    with pytest.raises(ValueError, match="n_val must be between 1 and 59999"):
        w.load_split({**SMOKE, "n_val": 60000})


# ------------------------------------------------------------------------------------------------
# the smoke profile end to end: the sweep, then final runs at the lr it chose
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("wnws_conv") / "smoke_converged.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sweep.sweep("wn_ws_training", "smoke_converged", out=out, device="cpu", progress=False, log=None)
    finally:
        torch.set_num_threads(threads)


def test_smoke_converged_records_both_phases(smoke_record):
    assert smoke_record["complete"] and len(smoke_record["runs"]) == len(w.runs(SMOKE))
    chosen = w.chosen_lrs(smoke_record)
    for r in smoke_record["runs"]:
        m, h = r["metrics"], r["history"]
        assert [row["epoch"] for row in h] == list(range(1, SMOKE["epochs"] + 1)) or m["diverged"]
        assert {"val_error", "test_error", "train_loss", "grad_norm"} <= set(h[-1])
        assert (m["n_train"], m["n_val"], m["n_test"]) == (SMOKE["n_train"], SMOKE["n_val"], SMOKE["n_test"])
        if r["config"]["phase"] == "final":
            assert m["lr"] == chosen[r["config"]["variant"]]["lr"]
            assert [lr for lr, _ in m["lr_sweep"]] == sorted(SMOKE["lr_grid"][r["config"]["variant"]])
    assert set(w.test_errors(smoke_record)) == set(SMOKE["variants"])
    assert len(w.claims(smoke_record)) == len(w.CLAIMS)
    assert set(w.flatness(smoke_record)) <= set(SMOKE["variants"])
    assert w.trains_at_any_lr(smoke_record)["grid"] == sorted(SMOKE["lr_grid"]["ws"])


def test_smoke_converged_final_run_is_deterministic_and_resumes(smoke_record, tmp_path):
    """Rerun a final run from the loaded record: the same numbers; and again through a checkpoint
    written after its first epoch (the trainer saves one per epoch): the same numbers again."""
    run = {"phase": "final", "variant": "ws_gn", "seed": 1}
    recorded = next(r for r in smoke_record["runs"] if r["config"] == run)
    untimed = lambda h: [{k: v for k, v in row.items() if k != "time_s"} for row in h]  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = tmp_path / "run.pt"
        again = w.run_one(run, SMOKE, checkpoint=ckpt, record=smoke_record)
        assert ckpt.exists(), "run_one hands its checkpoint to the Trainer"
        resumed = w.run_one(run, SMOKE, checkpoint=ckpt, record=smoke_record)  # resumes from epoch 1
    finally:
        torch.set_num_threads(threads)
    for result in (again, resumed):
        assert result["metrics"] == recorded["metrics"]
        assert untimed(result["history"]) == untimed(recorded["history"])


def test_cpu_converged_fits_its_budget():
    """~4 CPU-hours at the measured seconds per epoch (`EPOCH_S`): adding runs must be paid for elsewhere."""
    hours = w.cpu_hours(w.PROFILES["cpu_converged"])
    assert 2.0 < hours <= 4.0, hours
    assert w.cpu_hours(SMOKE) * 3600 < 10


# One variant, two sweep lrs, two final seeds: with two processes, whichever finishes its sweep run first
# reaches a final run before the other's sweep run is recorded: NotReady, deferred by the sweep, retried.
ONE_VARIANT = '''
from normlab.experiments import wn_ws_training as w
from normlab.experiments.wn_ws_training import runs, run_one  # noqa: F401
PROFILES = {"cpu": {**w.PROFILES["smoke_converged"], "variants": ["bn"], "lr_grid": {"bn": [0.01, 0.05]},
                    "seeds": {"bn": [0, 1]}, "n_train": 2048}}
'''


@pytest.mark.slow
def test_two_processes_share_the_sweep_and_finals_wait_for_it(tmp_path):
    import sys

    (tmp_path / "wnws_one").mkdir()
    (tmp_path / "wnws_one" / "__init__.py").write_text("")
    (tmp_path / "wnws_one" / "exp.py").write_text(ONE_VARIANT)
    out = tmp_path / "cpu.json"
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "normlab", "run", "wnws_one.exp", "--profile", "cpu", "--device", "cpu",
           "--threads", "1", "--parallel", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["complete"] and len(record["runs"]) == 4
    chosen = w.chosen_lrs(record)["bn"]["lr"]
    finals = [r for r in record["runs"] if r["config"]["phase"] == "final"]
    assert len(finals) == 2 and all(r["metrics"]["lr"] == chosen for r in finals)
    assert w.difference(record, "bn", "bn").estimate == 0.0


def test_a_diverged_sweep_run_says_so_and_cannot_be_chosen():
    result = w.run_one({"phase": "sweep", "variant": "plain", "lr": 1e30, "seed": 100}, SMOKE)
    assert result["metrics"]["diverged"] and result["history"][-1]["diverged"]
    recorded = {"config": {"lr": 1e30}, "metrics": results.finite(result["metrics"])[0]}
    with pytest.raises(ValueError, match="every lr of the sweep of 'plain'"):
        w.select_lr([recorded], "plain")
