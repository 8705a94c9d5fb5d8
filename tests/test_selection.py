"""The one rule every experiment picks its learning rate by, and the convergence check's tail change."""

import math

import pytest
import torch

from normlab import data, selection


def test_choose_lr_lowest_median_ties_to_smaller_and_diverged_seeds_rule_an_lr_out():
    assert selection.choose_lr({0.1: [20.0], 0.3: [18.0], 1.0: [25.0]}) == 0.3
    assert selection.choose_lr({0.1: [18.0], 0.3: [18.0]}) == 0.1  # a tie: the smaller (safer) lr
    # the median, not the mean: one bad seed of three does not move the choice (means 30 vs 22)
    assert selection.choose_lr({0.1: [20.0, 21.0, 49.0], 0.3: [22.0, 22.0, 22.0]}) == 0.1
    assert selection.choose_lr({0.1: [30.0], 0.3: [10.0, None]}) == 0.1  # one diverged seed rules 0.3 out
    assert selection.choose_lr({0.1: [30.0], 0.3: [10.0, math.nan]}) == 0.1  # NaN counts as diverged
    assert selection.choose_lr({0.1: [math.inf], 0.3: [500.0]}) == 0.3  # never reached a target: infinitely slow
    with pytest.raises(ValueError, match="every lr of the sweep of ws .*smaller learning rates"):
        selection.choose_lr({0.1: [None], 0.3: [None, 1.0]}, "ws")
    with pytest.raises(ValueError, match="has no runs"):
        selection.choose_lr({0.1: []})


def test_sweep_scores_map_each_lr_to_its_seeds_with_none_for_diverged_runs():
    def run(lr, val, diverged=False):
        return {"config": {"lr": lr}, "metrics": {"val_error": val, "diverged": diverged, "val_loss": val / 10}}
    runs = [run(0.1, 20.0), run(0.3, 18.0), run(0.1, 21.0), run(0.3, 5.0, diverged=True)]
    assert selection.sweep_scores(runs) == {0.1: [20.0, 21.0], 0.3: [18.0, None]}
    assert selection.sweep_scores(runs, "val_loss") == {0.1: [2.0, 2.1], 0.3: [1.8, None]}
    assert selection.choose_lr(selection.sweep_scores(runs)) == 0.1  # 0.3's diverged seed rules it out
    assert selection.sweep_scores([]) == {}


def test_lr_table_and_edge():
    assert selection.lr_table({1.0: [15.0, None], 0.1: [20.0, 22.0]}, name="val_error") == [
        {"lr": 0.1, "val_error": 21.0, "n": 2, "diverged": 0}, {"lr": 1.0, "val_error": None, "n": 2, "diverged": 1}]
    assert [selection.edge(lr, [0.3, 0.1, 1.0]) for lr in (0.1, 0.3, 1.0)] == ["low", None, "high"]
    with pytest.raises(ValueError, match="not in the grid"):
        selection.edge(0.2, [0.1, 0.3])


def test_tail_change_reads_the_last_fraction_of_the_curve():
    history = [{"epoch": e, "test_error": 50.0 - e} for e in range(1, 11)] + [{"epoch": 10, "train_loss": 0.1}]
    assert selection.tail_change(history, "test_error", 0.2) == (8, -2.0)
    assert selection.tail_change(history, "test_error", 0.5) == (5, -5.0)
    steps = [{"step": s, "val_loss": v} for s, v in ((0, 4.0), (50, None), (100, 2.0), (150, 1.9), (200, 1.9))]
    assert selection.tail_change(steps, "val_loss", 0.2, "step") == (150, 0.0)  # last eval at or before 160
    with pytest.raises(ValueError, match="did not finish"):
        selection.tail_change(history, "test_error", 0.2, end=12)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        selection.tail_change(history, "test_error", 1.0)
    with pytest.raises(ValueError, match="at or before epoch 0.8"):
        selection.tail_change([{"epoch": 1, "test_error": 3.0}], "test_error", 0.2)


def test_holdout_is_disjoint_seeded_and_keeps_the_test_set():
    n = 50
    split = data.Split(torch.arange(n).view(n, 1, 1, 1).to(torch.uint8), torch.arange(n),
                       torch.zeros(5, 1, 1, 1, dtype=torch.uint8), torch.arange(5), "toy")
    train, vx, vy = data.holdout(split, 10, seed=3)
    assert len(vy) == 10 and len(train.train_labels) == 40 and train.test_labels is split.test_labels
    assert set(vy.tolist()).isdisjoint(train.train_labels.tolist())
    assert set(vy.tolist()) | set(train.train_labels.tolist()) == set(range(n))
    assert train.train_labels.tolist() == sorted(train.train_labels.tolist())  # original order
    assert torch.equal(vx.flatten().long(), vy)  # images travel with their labels
    again, vx2, vy2 = data.holdout(split, 10, seed=3, n_train=20)
    assert torch.equal(vy2, vy) and len(again.train_labels) == 20  # the same validation images at any n_train
    assert not torch.equal(data.holdout(split, 10, seed=4)[2], vy)
    with pytest.raises(ValueError, match="n_val must be between 1 and 49"):
        data.holdout(split, 50, seed=0)
    with pytest.raises(ValueError, match="lower n_val or n_train"):
        data.holdout(split, 10, seed=0, n_train=41)
