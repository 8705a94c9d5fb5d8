"""The converged GN-vs-BN record's readers on hand-built records with known answers."""

from __future__ import annotations

import pytest

from normlab.experiments import gn_batch_size as exp


def _record(errors):
    """errors: {(norm, N, epochs): [per-seed test errors]}."""
    runs = [{"config": {"norm": norm, "batch_size": n, "seed": s, "epochs": e}, "seed": s,
             "metrics": {"test_error": v}}
            for (norm, n, e), vs in errors.items() for s, v in enumerate(vs)]
    return {"config": {"epochs": 60}, "runs": runs}


REC = _record({
    ("bn", 32, 30): [22.0, 23.0, 24.0], ("gn", 32, 30): [28.0, 29.0, 30.0],
    ("bn", 2, 30): [26.0, 27.0, 28.0], ("gn", 2, 30): [28.0, 28.5, 29.0],
    ("bn", 32, 60): [20.0, 21.0, 22.0], ("gn", 32, 60): [25.0, 26.5, 27.0],
    ("bn", 2, 60): [25.0, 26.0, 27.0], ("gn", 2, 60): [26.0, 26.0, 26.0],
})


def test_differences_at_the_longest_training():
    d = exp.differences(REC)
    assert (d["epochs"], d["N_large"], d["N_small"]) == (60, 32, 2)
    assert d["bn_small_minus_large"].estimate == pytest.approx(5.0)
    assert d["bn_small_minus_large"].low == pytest.approx(5.0) == d["bn_small_minus_large"].high  # constant shift
    assert d["gn_minus_bn"][32].estimate == pytest.approx((5 + 5.5 + 5) / 3)
    assert d["gn_minus_bn"][2].estimate == pytest.approx((1 + 0 - 1) / 3)
    assert exp.differences(REC, epochs=30)["gn_minus_bn"][32].estimate == pytest.approx(6.0)


def test_differences_default_to_the_longest_training_every_n_has():
    # the doubling runs train only the largest and smallest N: the headline stays at 30 epochs
    rec = _record({
        ("bn", 8, 30): [24.0, 25.0, 26.0], ("gn", 8, 30): [28.0, 29.0, 30.0]})
    rec["runs"] += REC["runs"]
    d = exp.differences(rec)
    assert d["epochs"] == 30 and set(d["gn_minus_bn"]) == {32, 8, 2}
    assert d["gn_minus_bn"][8].estimate == pytest.approx(4.0)
    assert exp.differences(rec, epochs=60)["gn_minus_bn"].keys() == {32, 2}


def test_epoch_doubling_compares_the_change_with_the_seed_spread():
    e = exp.epoch_doubling(REC, 32)
    assert e["epochs"] == (30, 60)
    assert e["short"].estimate == pytest.approx(6.0)
    # per seed: 60-epoch difference (5, 5.5, 5) minus the 30-epoch one (6, 6, 6)
    assert e["change"].estimate == pytest.approx((-1 - 0.5 - 1) / 3)
    assert e["spread"] == pytest.approx(0.5)
    assert e["stable"] is False
    assert e["per_seed"] == {"short": {0: 6.0, 1: 6.0, 2: 6.0}, "long": {0: 5.0, 1: 5.5, 2: 5.0}}
    # N=2: differences (2, 1.5, 1) at 30 epochs and (1, 0, -1) at 60: moved by -1.5, less than the spread 2
    e2 = exp.epoch_doubling(REC, 2)
    assert e2["change"].estimate == pytest.approx(-1.5)
    assert e2["spread"] == pytest.approx(2.0)
    assert e2["stable"] is True


def test_doubling_checks_take_each_doubling_in_turn():
    rec = _record({("bn", 32, 120): [19.0, 20.0, 21.0], ("gn", 32, 120): [24.0, 25.5, 26.0]})
    rec["runs"] += REC["runs"]
    checks = exp.doubling_checks(rec, 32)
    assert [c["epochs"] for c in checks] == [(30, 60), (60, 120)]
    assert checks[0] == exp.epoch_doubling(REC, 32)  # the first doubling, as in a record without 120 epochs
    assert checks[1]["change"].estimate == pytest.approx(0.0) and checks[1]["stable"] is True  # 5, 5.5, 5 again
    assert exp.epoch_doubling(rec, 32) == checks[1]  # default: the two longest lengths
    assert [c["epochs"] for c in exp.doubling_checks(rec, 2)] == [(30, 60)]  # no 120 epochs at N=2
    with pytest.raises(ValueError, match="between 30 and 120 epochs: the record trains"):
        exp.epoch_doubling(REC, 32, between=(30, 120))


def test_epoch_doubling_needs_two_lengths():
    one = _record({("bn", 32, 30): [1.0, 2.0], ("gn", 32, 30): [1.0, 2.0]})
    with pytest.raises(ValueError, match="epoch_list"):
        exp.epoch_doubling(one, 32)


def test_differences_pair_the_common_seeds_and_skip_cells_below_two():
    # a record still being recorded: BN N=2 has seeds 0 and 1 only, GN N=2 seed 0 only
    rec = _record({("bn", 32, 30): [22.0, 23.0, 24.0], ("gn", 32, 30): [28.0, 29.0, 30.0],
                   ("bn", 2, 30): [26.0, 28.0], ("gn", 2, 30): [27.0]})
    d = exp.differences(rec)
    assert d["bn_small_minus_large"].n == 2 and d["bn_small_minus_large"].estimate == pytest.approx(4.5)
    assert d["gn_small_minus_large"] is None
    assert set(d["gn_minus_bn"]) == {32}


def test_epoch_doubling_with_one_seed_gives_no_interval_and_no_verdict():
    one = _record({("bn", 32, 30): [22.0], ("gn", 32, 30): [28.0], ("bn", 32, 60): [20.0], ("gn", 32, 60): [25.0]})
    e = exp.epoch_doubling(one, 32)
    assert e["short"] is None and e["long"] is None and e["change"] is None
    assert e["spread"] is None and e["stable"] is None
    assert e["per_seed"] == {"short": {0: 6.0}, "long": {0: 5.0}}  # what the chapter prints meanwhile
    assert exp.epoch_doubling(one, 2)["stable"] is None  # no runs at all at that N


def test_progress_counts_the_profile_runs():
    rec = {"config": exp.PROFILES["cpu_converged"], "runs": [{}] * 9, "complete": False}
    assert exp.progress(rec) == {"recorded": 9, "planned": 5 * 2 * 3 + 2 * 2 * 3 * 2, "complete": False}
    lengths = [r["epochs"] for r in exp.runs(rec["config"])]
    assert lengths == sorted(lengths)  # each length complete before the next doubling starts


def test_seed_stats_are_means_at_the_headline_length():
    s = exp.seed_stats(REC)  # headline: 60 epochs (every N has them)
    assert s["gn"][32] == {"mean": pytest.approx((25 + 26.5 + 27) / 3), "min": 25.0, "max": 27.0, "n": 3}
    assert list(s["bn"]) == [32, 2]
    assert exp.seed_stats(REC, epochs=30)["bn"][2]["mean"] == pytest.approx(27.0)


def _with_history(curves):
    """curves: {(norm, N): [per-seed lists of train errors, one per epoch]}, 2 epochs, 30 epochs long."""
    runs = [{"config": {"norm": norm, "batch_size": n, "seed": s, "epochs": 30}, "seed": s,
             "metrics": {"test_error": 50.0, "train_error": errs[-1]},
             "history": [{"epoch": e + 1, "train_error": v, **({"test_error": 50.0} if e else {})}
                         for e, v in enumerate(errs)]}
            for (norm, n), per_seed in curves.items() for s, errs in enumerate(per_seed)]
    return {"config": {"epochs": 30}, "runs": runs}


HIST = _with_history({("bn", 32): [[60.0, 30.0], [62.0, 32.0], [64.0, 31.0]],
                      ("gn", 32): [[58.0, 27.0], [60.0, 28.0], [61.0, 29.0]],
                      ("bn", 2): [[70.0, 40.0]], ("gn", 2): [[65.0, 35.0]]})


def test_curve_averages_the_seeds_per_epoch():
    c = exp.curve(HIST, "bn", 32)
    assert c["epoch"] == [1, 2] and c["n"] == 3
    assert c["mean"] == pytest.approx([62.0, 31.0]) and c["min"] == [60.0, 30.0] and c["max"] == [64.0, 32.0]
    assert exp.curve(HIST, "bn", 32, metric="test_error")["epoch"] == [2]  # test error only at epoch 2
    assert exp.curve(HIST, "bn", 8) is None


def test_gn_minus_bn_of_the_final_training_error():
    g = exp.gn_minus_bn(HIST, 32, "train_error")
    assert g["per_seed"] == {0: -3.0, 1: -4.0, 2: -2.0}
    assert g["interval"].estimate == pytest.approx(-3.0) and g["interval"].high < 0  # GN fits better
    one = exp.gn_minus_bn(HIST, 2, "train_error")
    assert one["per_seed"] == {0: -5.0} and one["interval"] is None


def test_gn_flatness_spread_and_interval():
    f = exp.gn_flatness(REC, epochs=30)
    assert f["means"] == {32: pytest.approx(29.0), 2: pytest.approx(28.5)}
    assert f["spread"] == pytest.approx(0.5)
    assert f["small_minus_large"].estimate == pytest.approx(-0.5)  # per seed 0, -0.5, -1


def test_length_curve_over_records_and_lengths():
    short = _record({("bn", 32, 5): [60.0, 61.0], ("gn", 32, 5): [65.0, 67.0]})
    short["profile"], REC_P = "cpu", {**REC, "profile": "cpu_converged"}
    rows = exp.length_curve([short, REC_P], 32)
    assert [(r["profile"], r["epochs"]) for r in rows] == [("cpu", 5), ("cpu_converged", 30), ("cpu_converged", 60)]
    assert rows[0]["mean"] == pytest.approx(5.5) and (rows[0]["min"], rows[0]["max"]) == (5.0, 6.0)
    assert rows[2]["per_seed"] == {0: 5.0, 1: 5.5, 2: 5.0}
    assert rows[2]["interval"].estimate == pytest.approx(rows[2]["mean"])


# GN as the paper finds it: flat across N, equal to BN at N=32, better at N=2; BN degrades
HOLDS_REC = _record({("bn", 32, 30): [22.0, 23.0, 24.0], ("bn", 2, 30): [27.0, 28.0, 29.5],
                     ("gn", 32, 30): [22.2, 23.1, 24.0], ("gn", 2, 30): [22.0, 23.2, 24.1]})
# every claim fails: BN improves at small N, GN moves by 3 points, trails BN by 6 at N=32 and by 10 at N=2
FAILS_REC = _record({("bn", 32, 30): [22.0, 23.0, 24.0], ("bn", 2, 30): [21.0, 22.0, 23.0],
                     ("gn", 32, 30): [28.0, 29.0, 30.0], ("gn", 2, 30): [31.0, 32.2, 32.9]})


def test_verdicts_when_every_claim_holds():
    v = exp.verdicts(HOLDS_REC)
    assert (v["epochs"], v["N_large"], v["N_small"], v["margin"]) == (30, 32, 2, exp.EQUIVALENCE_MARGIN)
    assert [w for _, _, w in v["rows"]] == ["holds"] * 4
    assert v["rows"][0][1].estimate == pytest.approx((5 + 5 + 5.5) / 3)  # BN(N=2) - BN(N=32) per seed
    assert v["doubling"] == {}  # one training length
    from normlab import stats

    assert "holds" in stats.verdict_table(v["rows"])


def test_verdicts_when_no_claim_holds():
    v = exp.verdicts(FAILS_REC)
    assert [w for _, _, w in v["rows"]] == ["does not hold"] * 4
    # a tighter or looser margin changes only the two equivalence claims
    assert [w for _, _, w in exp.verdicts(FAILS_REC, margin=20.0)["rows"]] == \
        ["does not hold", "holds", "holds", "does not hold"]


def test_verdicts_of_a_record_with_one_seed_are_not_tested():
    one = _record({("bn", 32, 30): [22.0], ("bn", 2, 30): [27.0], ("gn", 32, 30): [22.2], ("gn", 2, 30): [22.0]})
    v = exp.verdicts(one)
    assert all(iv is None and w == "not tested here" for _, iv, w in v["rows"])


def test_verdicts_include_the_epoch_doubling_check():
    v = exp.verdicts(REC)  # headline at 60 epochs: the longest length every N has
    assert v["epochs"] == 60 and set(v["doubling"]) == {32, 2}
    assert (v["doubling"][32]["stable"], v["doubling"][2]["stable"]) == (False, True)


def test_interval_text_says_why_there_is_no_interval():
    assert "fewer than 2 seeds" in exp.interval_text(None)
    iv = exp.differences(REC)["bn_small_minus_large"]
    assert exp.interval_text(iv) == "5.00 [5.00, 5.00] (95% t, 3 seeds)"


def test_paper_differences():
    p = exp.paper_differences()
    assert p["bn_small_minus_large"] == pytest.approx(11.1) and p["gn_small_minus_large"] == pytest.approx(0.0)
    assert p["gn_spread"] == pytest.approx(0.2)
    assert p["gn_minus_bn"][32] == pytest.approx(0.5) and p["gn_minus_bn"][2] == pytest.approx(-10.6)


def test_verdicts_wait_for_three_seeds():
    # two seeds give an interval, but no verdict: the book's minimum for a compared cell is 3
    two = _record({("bn", 32, 30): [22.0, 23.0], ("gn", 32, 30): [28.0, 29.5],
                   ("bn", 2, 30): [26.0, 27.0], ("gn", 2, 30): [28.0, 28.5]})
    rows = exp.verdicts(two)["rows"]
    assert all(word == "not tested here" for _, _, word in rows)
    assert rows[2][1] is not None and rows[2][1].n == 2


# ---------------------------------------------------------------------------------------------------
# the checks of GN's handicap in the short-sweep protocol: number of groups, depth and width
# ---------------------------------------------------------------------------------------------------


def _base(bn32, gn32, seeds=(0, 1, 2)):
    """A cpu_long-like record (ResNet-8 width 16, G=8): BN and GN at N=32 with these per-seed errors."""
    runs = [{"config": {"norm": norm, "batch_size": 32, "seed": s}, "seed": s,
             "metrics": {"test_error": v, "train_error": v - 4}}
            for norm, vs in (("bn", bn32), ("gn", gn32)) for s, v in zip(seeds, vs)]
    return {"config": {"depth": 8, "width": 16, "gn_groups": 8, "seeds": list(seeds)}, "runs": runs}


def test_capacity_gaps_and_verdicts_pair_each_model_by_seed():
    from normlab import stats
    from normlab.experiments import gn_batch_size_capacity as cap

    base = _base([38.0, 39.0, 40.0], [48.0, 49.0, 50.0])          # GN - BN = 10 on every seed
    errors = {(20, 16): ([36.0, 37.0, 38.0], [42.0, 43.5, 44.0]),  # gap 6, 6.5, 6: narrower
              (8, 32): ([33.0, 34.0, 35.0], [44.0, 45.0, 46.5])}  # gap 11, 11, 11.5: wider
    runs = [{"config": {"norm": norm, "depth": d, "width": w, "batch_size": 32, "seed": s}, "seed": s,
             "metrics": {"test_error": v}}
            for (d, w), pair in errors.items() for norm, vs in zip(("bn", "gn"), pair) for s, v in enumerate(vs)]
    rec = {"config": {"batch_size": 32, "seeds": [0, 1, 2], "models": [[20, 16], [8, 32]], "depth": 8, "width": 16},
           "runs": runs}
    g = cap.gaps(rec, base)
    assert [(r["depth"], r["width"]) for r in g] == [(8, 16), (20, 16), (8, 32)]
    assert g[0]["per_seed"] == {0: 10.0, 1: 10.0, 2: 10.0} and g[0]["interval"].estimate == pytest.approx(10.0)
    assert g[1]["interval"].estimate == pytest.approx(37 / 6) and g[1]["interval"].n == 3
    rows = cap.verdicts(rec, base)
    assert [word for _, _, word in rows] == [stats.DOES_NOT_HOLD] * 3 + [stats.HOLDS, stats.DOES_NOT_HOLD]
    assert rows[3][0] == "ResNet-20 width 16 narrows GN's gap vs ResNet-8 width 16"
    assert rows[3][1].estimate == pytest.approx(37 / 6 - 10)
    one = {**rec, "runs": [r for r in rec["runs"] if r["seed"] == 0]}  # one seed: no interval, no verdict
    assert all(iv is None and word == stats.NOT_TESTED for _, iv, word in cap.verdicts(one, base)[1:])


def test_groups_table_and_verdicts():
    from normlab import stats
    from normlab.experiments import gn_batch_size_groups as groups

    base = _base([38.0, 39.0, 40.0], [48.0, 49.0, 50.0])
    per_g = {1: [48.0, 48.5, 49.5], 8: [48.0, 49.0, 50.0], 16: [49.0, 50.5, 51.0]}
    runs = [{"config": {"norm": "gn", "gn_groups": g, "batch_size": 32, "seed": s}, "seed": s,
             "metrics": {"test_error": v, "train_error": v - 5}} for g, vs in per_g.items() for s, v in enumerate(vs)]
    rec = {"config": {"batch_size": 32, "seeds": [0, 1, 2], "group_list": [1, 8, 16], "width": 16}, "runs": runs}
    t = groups.table(rec, base)
    assert [r["G"] for r in t] == [1, 8, 16] and [r["per_group"] for r in t] == [[16, 32, 64], [2, 4, 8], [1, 2, 4]]
    assert t[0]["mean"] == pytest.approx(146 / 3) and t[0]["train_error"] == pytest.approx(146 / 3 - 5)
    assert t[1]["minus_bn"].estimate == pytest.approx(10.0) and t[1]["minus_bn"].low == pytest.approx(10.0)
    rows = groups.verdicts(rec, base)
    assert [text for text, _, _ in rows] == ["GN (G=1) trails BN at N=32", "GN (G=8) trails BN at N=32",
                                             "GN (G=16) trails BN at N=32", "G=16 is worse than G=8"]
    assert [word for _, _, word in rows] == [stats.HOLDS] * 4  # G=16 - G=8: 1, 1.5, 1
    assert rows[3][1].estimate == pytest.approx(3.5 / 3)


def test_cost_estimate_against_the_runs_it_priced():
    from normlab.experiments import gn_batch_size_cost as cost_exp

    cost = {"runs": [{"config": {"image_size": size, "norm": norm, "batch_size": n, "precision": p},
                      "metrics": {"s_per_epoch": t}}
                     for size, norm, n, p, t in [(16, "bn", 32, "auto", 10.0), (16, "gn", 32, "auto", 8.0),
                                                 (16, "bn", 32, "fp32", 99.0), (32, "bn", 32, "auto", 30.0)]]}
    assert cost_exp.per_epoch(cost) == {(16, "bn", 32): 10.0, (16, "gn", 32): 8.0, (32, "bn", 32): 30.0}
    sweep = {"config": {"image_size": 16, "epochs": 60}, "runs": [
        {"config": {"norm": "bn", "batch_size": 32, "epochs": 30}, "wall_s": 450.0, "history": []},
        {"config": {"norm": "gn", "batch_size": 32, "epochs": 30}, "wall_s": 60.0, "history": [{"time_s": 360.0}]},
        {"config": {"norm": "bn", "batch_size": 32, "epochs": 60}, "wall_s": 999.0, "history": []},  # other length
        {"config": {"norm": "bn", "batch_size": 2, "epochs": 30}, "wall_s": 999.0, "history": []}]}  # not priced
    got = cost_exp.against(cost, sweep, 30)
    assert got["runs"] == 2 and got["measured_s"] == 450.0 + 360.0  # the resumed run counts its trainer's clock
    assert got["estimated_s"] == (10.0 + 8.0) * 30 and got["ratio"] == pytest.approx(810.0 / 540.0)
    unpriced = {"config": {"image_size": 24, "epochs": 30}, "runs": sweep["runs"]}  # a size the record did not time
    assert cost_exp.against(cost, unpriced, 30) == {"runs": 0, "measured_s": 0, "estimated_s": 0, "ratio": None}
