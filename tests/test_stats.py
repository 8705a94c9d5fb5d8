"""normlab.stats: intervals against hand computations and tables, the verdict rules, refused inputs."""

from __future__ import annotations

import doctest
import math
import statistics

import numpy as np
import pytest

from normlab import bench, stats
from normlab.stats import (CLAIM_VERDICTS, DOES_NOT_HOLD, HOLDS, MEASURED_VERDICTS, NOT_TESTED, VERDICTS,
                           MIN_SEEDS, WITHIN_NOISE, Interval, median_iqr, paired_difference, ratio_of_medians,
                           seed_verdict, t_quantile, unpaired_difference, verdict, verdict_table)

# --- the t quantile -------------------------------------------------------------------------------------

# t_{0.975, df} from a printed table, 3 decimals
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, math.inf: 1.960}
# 6 decimals (standard tables), for the quantiles intervals here actually use
TABLE_6 = {(0.975, 2): 4.302653, (0.975, 3): 3.182446, (0.975, 4): 2.776445, (0.975, 10): 2.228139,
           (0.995, 3): 5.840909, (0.95, 4): 2.131847, (0.95, 10): 1.812461, (0.975, 30): 2.042272}


@pytest.mark.parametrize("df", list(TABLE_975))
def test_t_quantile_matches_the_table_to_3_decimals(df):
    assert round(t_quantile(0.975, df), 3) == TABLE_975[df]


@pytest.mark.parametrize("p_df", list(TABLE_6))
def test_t_quantile_matches_6_decimal_values(p_df):
    p, df = p_df
    assert t_quantile(p, df) == pytest.approx(TABLE_6[p_df], abs=1e-6)


@pytest.mark.parametrize("p", [1e-9, 0.01, 0.1, 0.3, 0.7, 0.9, 0.975, 0.999, 1 - 1e-9])
def test_t_quantile_matches_closed_forms_for_1_and_2_df(p):
    # df=1 is the Cauchy distribution, F^{-1}(p) = -cot(pi p), written in the smaller tail so that it is
    # accurate near 0 and 1; df=2 has F^{-1}(p) = (2p - 1) / sqrt(2 p (1 - p))
    cauchy = -1 / math.tan(math.pi * p) if p < 0.5 else 1 / math.tan(math.pi * (1 - p))
    assert t_quantile(p, 1) == pytest.approx(cauchy, rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_is_symmetric_monotone_and_tends_to_the_normal():
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.025, 4.7) == pytest.approx(-t_quantile(0.975, 4.7), rel=1e-12)
    qs = [t_quantile(0.975, df) for df in (1, 1.5, 2, 2.5, 3, 7.3, 50, 1e4)]  # fractional df: Welch
    assert all(x > y for x, y in zip(qs, qs[1:]))
    assert t_quantile(0.975, 1e6) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-5)


@pytest.mark.parametrize("p, df, fix", [(0, 3, "between 0 and 1"), (1.0, 3, "between 0 and 1"),
                                        (0.975, 0, "at least 2 values"), (0.975, math.nan, "at least 2 values")])
def test_t_quantile_refuses_bad_arguments(p, df, fix):
    with pytest.raises(ValueError, match=fix):
        t_quantile(p, df)


# --- paired differences ---------------------------------------------------------------------------------


def test_zero_difference_contains_zero_and_is_within_noise():
    a = [90.1, 91.3, 89.7, 90.8]
    b = [90.4, 91.0, 89.9, 90.6]  # differences -0.3, 0.3, -0.2, 0.2: mean 0
    iv = paired_difference(a, b)
    assert iv.estimate == pytest.approx(0.0, abs=1e-12)
    assert 0.0 in iv and iv.low < 0 < iv.high
    assert verdict(iv) == WITHIN_NOISE
    assert verdict(iv, direction="less") == WITHIN_NOISE
    assert verdict(iv, direction="two-sided") == WITHIN_NOISE


def test_clear_effect_holds_one_way_and_not_the_other():
    b = [80.0, 81.0, 79.5]
    a = [x + d for x, d in zip(b, [5.1, 4.9, 5.0])]
    iv = paired_difference(a, b)
    assert verdict(iv, direction="greater", threshold=0.0) == HOLDS
    assert verdict(iv, direction="less", threshold=0.0) == DOES_NOT_HOLD
    assert verdict(iv, direction="two-sided") == HOLDS
    assert verdict(iv, direction="greater", threshold=6.0) == DOES_NOT_HOLD  # "by more than 6": no


def test_paired_t_interval_equals_the_hand_computation():
    d = [5.1, 4.9, 5.0]  # mean 5, s_d = 0.1, n = 3: 5 +- 4.302653 * 0.1 / sqrt(3)
    iv = paired_difference(d, [0.0, 0.0, 0.0])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert iv.estimate == pytest.approx(5.0, abs=1e-12)
    assert iv.low == pytest.approx(5.0 - half, abs=1e-6)
    assert iv.high == pytest.approx(5.0 + half, abs=1e-6)
    assert iv.sd == pytest.approx(0.1, abs=1e-12) and iv.se == pytest.approx(0.1 / math.sqrt(3), abs=1e-12)
    assert (iv.n, iv.method, iv.confidence, iv.df) == (3, "t", 0.95, 2.0)


def test_paired_confidence_level_changes_the_quantile():
    d = [1.0, 2.0, 4.0, 3.0, 5.0]  # mean 3, s_d = sqrt(2.5)
    iv = paired_difference(d, [0.0] * 5, confidence=0.90)
    assert iv.high - iv.estimate == pytest.approx(2.131847 * math.sqrt(2.5) / math.sqrt(5), abs=1e-6)


def test_dicts_are_paired_by_seed_not_by_order():
    a = {0: 10.0, 1: 12.0, 2: 11.0}
    b = {2: 10.5, 0: 9.0, 1: 11.0}  # same seeds, other order: differences 1, 1, 0.5
    iv = paired_difference(a, b)
    ref = paired_difference([10.0, 12.0, 11.0], [9.0, 11.0, 10.5])
    assert iv == ref
    assert iv.estimate == pytest.approx(2.5 / 3)


def test_constant_differences_give_a_point_interval():
    iv = paired_difference([3.0, 4.0, 5.0], [2.0, 3.0, 4.0])
    assert (iv.low, iv.estimate, iv.high) == (1.0, 1.0, 1.0)
    assert verdict(iv) == HOLDS


@pytest.mark.parametrize("a, b, fix", [
    ([1.0], [0.5], "record at least 3 seeds"),
    ([], [], "record at least 3 seeds"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "equal lengths.*unpaired_difference"),
    ([1.0, None, 3.0], [1.0, 2.0, 3.0], "a at index 1 is None: drop or re-run"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, float("nan")], "b at index 2 is nan: drop or re-run"),
    ([1.0, 2.0, math.inf], [1.0, 2.0, 3.0], "index 2 is inf"),
    ({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 3: 3.0}, r"only in a: \[2\], only in b: \[3\].*run the missing seeds"),
    ({0: 1.0, 7: None}, {0: 1.0, 7: 2.0}, "a at seed 7 is None"),
    ({0: 1.0, 1: 2.0}, [1.0, 2.0], "as dicts keyed by seed, or both as sequences"),
    ("123", "456", "sequence of numbers"),
])
def test_paired_difference_refuses_bad_input_naming_the_fix(a, b, fix):
    with pytest.raises(ValueError, match=fix):
        paired_difference(a, b)


@pytest.mark.parametrize("kwargs, fix", [({"method": "bootstrap"}, "must be 't'"), ({"confidence": 95}, "e.g. 0.95")])
def test_paired_difference_refuses_bad_options(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], **kwargs)


# --- unpaired (Welch) -----------------------------------------------------------------------------------


def test_welch_equals_the_hand_computation_with_integer_df():
    # s_a^2 = s_b^2 = 1, n = 3 each: se^2 = 2/3, nu = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    iv = unpaired_difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert iv.df == pytest.approx(4.0, abs=1e-12)
    assert (iv.estimate, iv.n, iv.method) == (-3.0, (3, 3), "welch")
    assert iv.low == pytest.approx(-3.0 - half, abs=1e-6) and iv.high == pytest.approx(-3.0 + half, abs=1e-6)


def test_welch_equals_the_hand_computation_with_fractional_df():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 6.0, 7.0]  # s_a^2 = 5/3, s_b^2 = 7, means 2.5 and 5
    va, vb = (5 / 3) / 4, 7 / 3
    se = math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)  # = 7.5625 / 2.7801 = 2.720...
    iv = unpaired_difference(a, b)
    assert iv.df == pytest.approx(nu, rel=1e-12) and 2.72 < iv.df < 2.721
    assert iv.se == pytest.approx(se, rel=1e-12)
    # the quantile lies between the tabled ones for 2 and 3 df
    assert 3.182446 < (iv.high - iv.estimate) / se < 4.302653
    assert iv.high - iv.estimate == pytest.approx(t_quantile(0.975, nu) * se, rel=1e-12)
    assert iv.estimate == pytest.approx(-2.5)


def test_welch_with_two_constant_sides_is_a_point_with_pooled_df():
    iv = unpaired_difference({0: 2.0, 1: 2.0, 2: 2.0}, [1.5, 1.5, 1.5, 1.5])
    assert (iv.low, iv.estimate, iv.high, iv.se, iv.df) == (0.5, 0.5, 0.5, 0.0, 5.0)


def test_welch_refuses_a_side_with_one_value():
    with pytest.raises(ValueError, match="side b.*record at least 3 seeds"):
        unpaired_difference([1.0, 2.0, 3.0], [1.0])


# --- ratio of medians -----------------------------------------------------------------------------------


def _timings(n=21, seed=1):
    rng = np.random.default_rng(seed)
    den = 1e-3 * (1 + 0.05 * rng.random(n))
    num = 2 * den * (1 + 0.02 * rng.standard_normal(n))
    return num.tolist(), den.tolist()


def test_ratio_of_medians_recovers_a_factor_of_two_deterministically():
    num, den = _timings()
    iv = ratio_of_medians(num, den, n_boot=2000, seed=3)
    assert 2.0 in iv and 1.0 not in iv
    assert iv.estimate == pytest.approx(statistics.median(num) / statistics.median(den), rel=1e-12)
    assert iv.low <= iv.estimate <= iv.high
    assert (iv.n, iv.method) == (21, "bootstrap-paired")
    assert verdict(iv, direction="greater", threshold=1.0) == HOLDS  # num is slower
    assert verdict(iv, direction="less", threshold=1.0) == DOES_NOT_HOLD
    assert ratio_of_medians(num, den, n_boot=2000, seed=3) == iv  # same seed, same interval


def test_ratio_of_medians_is_the_documented_percentile_bootstrap():
    # the algorithm of the docstring, written out resample by resample with the standard library
    num, den = _timings(11, seed=5)
    rng = np.random.default_rng(7)
    ratios = []
    for _ in range(500):
        idx = rng.integers(0, 11, size=(1, 11))[0]
        ratios.append(statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx))
    ratios.sort()

    def quantile(q):  # linear interpolation between order statistics, numpy's default
        h = (len(ratios) - 1) * q
        return ratios[int(h)] + (h - int(h)) * (ratios[min(int(h) + 1, len(ratios) - 1)] - ratios[int(h)])

    iv = ratio_of_medians(num, den, n_boot=500, seed=7, confidence=0.9)
    assert iv.low == pytest.approx(quantile(0.05), rel=1e-12) and iv.high == pytest.approx(quantile(0.95), rel=1e-12)


def test_paired_bootstrap_cancels_drift_shared_by_a_repeat():
    rng = np.random.default_rng(0)
    drift = 1 + 3 * rng.random(15)  # a repeat is slow for both candidates
    den = (1e-3 * drift).tolist()
    num = (2e-3 * drift).tolist()
    paired = ratio_of_medians(num, den, n_boot=1000)
    indep = ratio_of_medians(num, den, n_boot=1000, paired=False)
    assert paired.low == pytest.approx(2.0) and paired.high == pytest.approx(2.0)
    assert indep.method == "bootstrap" and indep.n == (15, 15)
    assert indep.high - indep.low > 0.5  # resampled apart, the drift is noise


def test_ratio_of_medians_unequal_lengths_resample_independently():
    num, den = _timings(21)
    iv = ratio_of_medians(num[:17], den, n_boot=1000)
    assert iv.method == "bootstrap" and iv.n == (17, 21) and 2.0 in iv


@pytest.mark.parametrize("num, den, kwargs, fix", [
    ([1.0, 2.0], [1.0, 2.0, 3.0], {}, "num_times has 2 repeats: time at least 3"),
    ([1.0, 2.0, 3.0], [1.0, 0.0, 3.0], {}, "den_times at index 1 .* must be positive"),
    ([1.0, 2.0, None], [1.0, 2.0, 3.0], {}, "num_times at index 2 is None"),
    ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0], {"paired": True}, "pass paired=False"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"n_boot": 10}, "at least 100"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"confidence": 1.0}, "between 0 and 1"),
])
def test_ratio_of_medians_refuses_bad_input_naming_the_fix(num, den, kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        ratio_of_medians(num, den, **kwargs)


# --- verdicts -------------------------------------------------------------------------------------------


def iv(low, high):
    return Interval((low + high) / 2, low, high, 3, "t", 0.95)


@pytest.mark.parametrize("low, high, direction, threshold, expected", [
    (0.5, 1.0, "greater", 0.0, HOLDS),
    (0.0, 1.0, "greater", 0.0, WITHIN_NOISE),  # low == threshold: not above it
    (-1.0, 0.0, "greater", 0.0, DOES_NOT_HOLD),  # high == threshold: nothing above it
    (-2.0, -1.0, "greater", 0.0, DOES_NOT_HOLD),
    (0.2, 0.8, "greater", 1.0, DOES_NOT_HOLD),  # positive, but not by more than 1
    (0.5, 1.5, "greater", 1.0, WITHIN_NOISE),
    (-1.0, -0.5, "less", 0.0, HOLDS),
    (-1.0, 0.5, "less", 0.0, WITHIN_NOISE),
    (0.0, 1.0, "less", 0.0, DOES_NOT_HOLD),
    (0.6, 0.7, "less", 0.8, HOLDS),  # ratio of times: "at least 20% faster"
    (0.7, 0.9, "less", 0.8, WITHIN_NOISE),
    (0.5, 1.0, "two-sided", 0.0, HOLDS),
    (-1.0, -0.5, "two-sided", 0.0, HOLDS),
    (-0.5, 0.5, "two-sided", 0.0, WITHIN_NOISE),
])
def test_directional_verdicts(low, high, direction, threshold, expected):
    assert verdict(iv(low, high), direction=direction, threshold=threshold) == expected


@pytest.mark.parametrize("low, high, threshold, expected", [
    (-0.3, 0.4, 0.0, HOLDS),  # wholly inside (-0.5, 0.5)
    (-0.5, 0.4, 0.0, WITHIN_NOISE),  # touches the edge: not inside the open band
    (-0.3, 0.7, 0.0, WITHIN_NOISE),  # overlaps the upper edge
    (-0.9, 0.9, 0.0, WITHIN_NOISE),  # wider than the band
    (0.5, 0.9, 0.0, DOES_NOT_HOLD),  # wholly outside, above
    (-2.0, -0.6, 0.0, DOES_NOT_HOLD),  # wholly outside, below
    (0.97, 1.04, 1.0, HOLDS),  # a ratio centred on 1: the band is (0.5, 1.5)
    (1.6, 1.9, 1.0, DOES_NOT_HOLD),
])
def test_equivalence_verdicts(low, high, threshold, expected):
    assert verdict(iv(low, high), direction="equivalent", threshold=threshold, margin=0.5) == expected


def test_two_sided_with_a_margin_can_not_hold():
    assert verdict(iv(-0.1, 0.2), direction="two-sided", margin=0.5) == DOES_NOT_HOLD
    assert verdict(iv(-0.1, 0.7), direction="two-sided", margin=0.5) == WITHIN_NOISE
    assert verdict(iv(0.1, 0.2), direction="two-sided", margin=0.5) == HOLDS  # a difference, however small


def test_verdict_returns_only_measured_words_and_vocabularies_nest():
    assert set(MEASURED_VERDICTS) == {"holds", "does not hold", "within noise"}
    assert VERDICTS == MEASURED_VERDICTS + ("not tested here",) and NOT_TESTED == "not tested here"
    assert set(VERDICTS) < set(CLAIM_VERDICTS)
    assert {"partly", "wrong per source", "no source found", "not testable here"} <= set(CLAIM_VERDICTS)
    seen = {verdict(iv(lo, lo + w), direction=dr, margin=0.5 if dr in ("two-sided", "equivalent") else None)
            for lo in np.linspace(-2, 2, 9) for w in (0.0, 0.3, 3.0) for dr in stats.DIRECTIONS}
    assert seen == set(MEASURED_VERDICTS)
    assert stats.check_verdict("partly", CLAIM_VERDICTS) == "partly"
    with pytest.raises(ValueError, match="use one of"):
        stats.check_verdict("partly")  # not a chapter verdict


@pytest.mark.parametrize("interval, kwargs, fix", [
    (iv(0.0, 1.0), {"direction": "bigger"}, "direction must be one of"),
    (iv(0.0, 1.0), {"direction": "equivalent"}, "needs margin="),
    (iv(0.0, 1.0), {"direction": "greater", "margin": 0.5}, "put the smallest effect that matters in threshold"),
    (iv(0.0, 1.0), {"direction": "equivalent", "margin": -1.0}, "positive finite"),
    (iv(0.0, 1.0), {"threshold": math.nan}, "finite number"),
    (Interval(0.0, 1.0, -1.0, 3, "t", 0.95), {}, "low <= high"),
    (Interval(0.0, math.nan, 1.0, 3, "t", 0.95), {}, "low <= high"),
])
def test_verdict_refuses_bad_input_naming_the_fix(interval, kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        verdict(interval, **kwargs)


# --- the table ------------------------------------------------------------------------------------------


def test_verdict_table_is_fixed_width_rounded_and_deterministic():
    ratio = Interval(0.61234, 0.6, 0.65, 25, "bootstrap-paired", 0.95)
    diff = Interval(-0.00004, -0.3, 0.3, (3, 4), "welch", 0.90)
    rows = [("RMSNorm takes less time than LayerNorm", ratio, HOLDS), ("no accuracy change", diff, WITHIN_NOISE),
            ("helps at batch 64", None, NOT_TESTED)]
    text = verdict_table(rows, width=None)
    assert text == verdict_table(rows, width=None)
    lines = text.splitlines()
    assert lines == [
        "claim                                   estimate  interval           n  method                verdict",
        "RMSNorm takes less time than LayerNorm     0.612  [0.600, 0.650]    25  95% bootstrap-paired  holds",
        "no accuracy change                         0.000  [-0.300, 0.300]  3+4  90% welch             within noise",
        "helps at batch 64                              -  -                  -  -                     not tested here",
    ]  # -0.00004 rounds to 0.000, not -0.000
    assert "0.61" in verdict_table(rows, digits=2, width=None).splitlines()[1]
    # wider than the book's column (stats.TABLE_WIDTH): each claim on its line, its numbers below it
    assert max(map(len, lines)) > stats.TABLE_WIDTH
    assert verdict_table(rows).splitlines() == [
        "claim",
        "  estimate  interval           n  method                verdict",
        "RMSNorm takes less time than LayerNorm",
        "     0.612  [0.600, 0.650]    25  95% bootstrap-paired  holds",
        "no accuracy change",
        "     0.000  [-0.300, 0.300]  3+4  90% welch             within noise",
        "helps at batch 64",
        "         -  -                  -  -                     not tested here",
    ]
    narrow = [("no change", diff, WITHIN_NOISE)]  # fits: one line per claim
    assert verdict_table(narrow) == verdict_table(narrow, width=None)
    assert len(verdict_table(narrow).splitlines()) == 2


@pytest.mark.parametrize("rows, fix", [
    ([("x", iv(0, 1), "maybe")], "use one of"),
    ([("x", None, HOLDS)], "pass the interval, or say 'not tested here'"),
    ([("x", iv(0, 1))], r"each row is \(claim, interval, verdict\)"),
])
def test_verdict_table_refuses_bad_rows(rows, fix):
    with pytest.raises(ValueError, match=fix):
        verdict_table(rows)


# --- summaries and the benchmark ------------------------------------------------------------------------


def test_median_iqr_uses_the_exclusive_quartiles():
    assert median_iqr([1, 2, 3, 4, 5]) == (3, 1.5, 4.5)
    assert median_iqr([4, 1, 3, 2]) == (2.5, 1.25, 3.75)  # positions (n+1)/4 and 3(n+1)/4 of sorted values
    assert median_iqr([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_iqr([])


def test_summarize_reports_median_iqr():
    t = [0.3, 0.1, 0.2, 0.5, 0.4]
    q = median_iqr(t)
    assert bench.summarize(t) == {"median": q.median, "q25": q.q25, "q75": q.q75, "min": 0.1, "repeats": 5}


def test_compare_returns_the_raw_times_of_every_repeat():
    out = bench.compare({"a": lambda: sum(range(50)), "b": lambda: None}, repeats=5, warmup=0)
    for s in out.values():
        assert set(s) == {"median", "q25", "q75", "min", "repeats", "times"}
        assert len(s["times"]) == s["repeats"] == 5 and all(x > 0 for x in s["times"])
        assert s["median"] == statistics.median(s["times"]) and s["min"] == min(s["times"])
    iv_ = ratio_of_medians(out["a"]["times"], out["b"]["times"], n_boot=200)
    assert iv_.method == "bootstrap-paired" and iv_.n == 5


def test_docstring_examples_run():
    failures, tried = doctest.testmod(stats)
    assert tried >= 15 and failures == 0


# --- the seed minimum ------------------------------------------------------------------------------------


def test_seed_verdict_waits_for_the_book_minimum_of_seeds():
    assert MIN_SEEDS == 3
    clear = {0: 5.0, 1: 5.5, 2: 4.5, 3: 5.2}  # a clear effect over 0 on every seed
    zero = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    two = paired_difference({s: clear[s] for s in (0, 1)}, {s: zero[s] for s in (0, 1)})
    assert two.n == 2 and verdict(two) == HOLDS  # the plain rule would already say so
    assert seed_verdict(two) == NOT_TESTED
    three = paired_difference({s: clear[s] for s in (0, 1, 2)}, {s: zero[s] for s in (0, 1, 2)})
    assert seed_verdict(three) == HOLDS and seed_verdict(three, direction="less") == DOES_NOT_HOLD
    assert seed_verdict(three, min_seeds=4) == NOT_TESTED
    assert seed_verdict(paired_difference(clear, zero), min_seeds=4) == HOLDS
    assert seed_verdict(None, direction="less") == NOT_TESTED
    # an unpaired interval needs the minimum on both sides
    assert seed_verdict(unpaired_difference([5.0, 5.5, 4.5], [0.0, 0.1])) == NOT_TESTED
    assert seed_verdict(unpaired_difference([5.0, 5.5, 4.5], [0.0, 0.1, -0.1])) == HOLDS


@pytest.mark.parametrize("kwargs, fix", [({"min_seeds": 1}, "at least 2"), ({"min_seeds": 2.5}, "integer"),
                                         ({"direction": "sideways"}, "direction must be one of")])
def test_seed_verdict_refuses_bad_input_naming_the_fix(kwargs, fix):
    iv = Interval(1.0, 0.5, 1.5, 3, "t", 0.95)
    with pytest.raises(ValueError, match=fix):
        seed_verdict(iv, **kwargs)
