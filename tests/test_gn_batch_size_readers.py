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
    # N=2: differences (2, 1.5, 1) at 30 epochs and (1, 0, -1) at 60: moved by -1.5, less than the spread 2
    e2 = exp.epoch_doubling(REC, 2)
    assert e2["change"].estimate == pytest.approx(-1.5)
    assert e2["spread"] == pytest.approx(2.0)
    assert e2["stable"] is True


def test_epoch_doubling_needs_two_lengths():
    one = _record({("bn", 32, 30): [1.0, 2.0], ("gn", 32, 30): [1.0, 2.0]})
    with pytest.raises(ValueError, match="epoch_list"):
        exp.epoch_doubling(one, 32)
