"""The claims experiments (lr_by_norm, small_data, bn_depth, running_stats): their readers on hand-built
records give known answers, steps-to-target reads histories right, running statistics converge to
the population ones, and bad configs fail with errors that name the fix. (Their smoke profiles run in
test_experiments.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from normlab.experiments import _claims, bn_depth, lr_by_norm, running_stats, small_data
from normlab.models.small import DeepMLP, NormCNN, activation_norm
from normlab.norms import GroupNorm
from normlab.stats import paired_difference


def history(curve: dict[int, float | None]) -> list[dict]:
    return [{"step": s, "test_error": e} for s, e in curve.items()]


def run(seed: int, metrics: dict, curve: dict[int, float | None] | None = None, **config) -> dict:
    return {"config": {**config, "seed": seed}, "seed": seed, "metrics": metrics,
            "history": history(curve or {})}


# ------------------------------------------------------------------------------------ steps to target


def test_steps_to_target_is_the_first_evaluated_step_at_or_below_the_target():
    h = history({50: 40.0, 100: None, 150: 15.0, 200: 14.0, 250: 16.0}) + [{"step": 260, "train_loss": 0.3}]
    assert _claims.steps_to_target(h, 15.0) == 150   # at the target counts; None rows are skipped
    assert _claims.steps_to_target(h, 14.5) == 200
    assert _claims.steps_to_target(h, 10.0) is None  # never reached


@pytest.mark.parametrize("target", [0, 100, -3.0, 120.0, "15"])
def test_a_target_outside_0_100_percent_is_refused(target):
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        _claims.steps_to_target(history({50: 10.0}), target)


# ------------------------------------------------------------------------------------------ lr_by_norm


def lr_record() -> dict:
    """BN trains up to lr 1 (at 3 one seed diverges), no norm up to 0.1 (at 0.3 one seed ends at 25%)."""
    runs = []
    for seed in range(3):
        for lr, err in ((0.01, 16.0), (0.1, 12.0), (1.0, 13.0)):
            steps = {0.01: 600, 0.1: 200 + 100 * seed, 1.0: 400}[lr]
            runs.append(run(seed, {"test_error": err + 0.1 * seed, "diverged": False},
                            {100: 30.0, steps: 14.0, 1000: err}, norm="bn", lr=lr))
        runs.append(run(seed, {"test_error": None if seed == 1 else 14.0, "diverged": seed == 1},
                        {100: 30.0}, norm="bn", lr=3.0))
        for lr, err in ((0.01, 15.0), (0.1, 13.0)):
            steps = {0.01: 900, 0.1: (600, 800, 700)[seed]}[lr]
            runs.append(run(seed, {"test_error": err, "diverged": False}, {100: 40.0, steps: 14.5, 1000: err},
                            norm="none", lr=lr))
        runs.append(run(seed, {"test_error": 25.0 if seed == 2 else 14.0, "diverged": False}, {100: 50.0},
                        norm="none", lr=0.3))
    return {"config": {"trainable_error": 20.0, "target_error": 15.0, "lrs": [0.01, 0.1, 0.3, 1.0, 3.0]},
            "runs": runs}


def test_lr_readers_on_a_hand_built_record():
    r = lr_record()
    assert lr_by_norm.trainable_lrs(r, "bn") == [0.01, 0.1, 1.0]
    assert lr_by_norm.largest_trainable_lr(r, "bn") == 1.0
    assert lr_by_norm.largest_trainable_lr(r, "none") == 0.1
    assert lr_by_norm.lr_ratio(r) == pytest.approx(10.0)
    assert lr_by_norm.largest_trainable_lr(r, "none", max_error=13.5) == 0.1
    assert lr_by_norm.largest_trainable_lr(r, "none", max_error=12.0) is None  # nothing below 12%
    assert lr_by_norm.lr_ratio(r, max_error=12.0) is None
    assert lr_by_norm.best_lr(r, "bn") == 0.1 and lr_by_norm.best_lr(r, "none") == 0.1
    assert lr_by_norm.best_lr(r, "bn", criterion="steps_to_target") == 0.1  # 200-400 beats 400 and 600
    assert lr_by_norm.steps_to_target_at_best(r, "bn") == {0: 200, 1: 300, 2: 400}
    assert lr_by_norm.steps_to_target_at_best(r, "none") == {0: 600, 1: 800, 2: 700}
    assert lr_by_norm.steps_to_target_at_best(r, "none", target_error=12.5) == {0: None, 1: None, 2: None}


def test_convergence_speedup_is_the_geometric_mean_ratio_with_a_log_t_interval():
    iv = lr_by_norm.convergence_speedup(lr_record())
    ratios = [600 / 200, 800 / 300, 700 / 400]
    assert iv.estimate == pytest.approx(math.prod(ratios) ** (1 / 3))
    logs = paired_difference([math.log(600), math.log(800), math.log(700)],
                             [math.log(200), math.log(300), math.log(400)])
    assert (iv.low, iv.high) == pytest.approx((math.exp(logs.low), math.exp(logs.high)))
    assert iv.method == "t-log" and iv.n == 3 and iv.low < iv.estimate < iv.high


def test_a_speedup_with_a_seed_that_never_reached_the_target_names_the_fix():
    with pytest.raises(ValueError, match="reached the target"):
        lr_by_norm.convergence_speedup(lr_record(), target_error=12.5)


def test_best_lr_of_a_cell_that_diverged_everywhere_says_to_extend_the_grid():
    r = {"config": {"target_error": 15.0}, "runs": [run(0, {"test_error": None, "diverged": True}, norm="bn", lr=1.0)]}
    with pytest.raises(ValueError, match="smaller learning rates"):
        lr_by_norm.best_lr(r, "bn")
    with pytest.raises(ValueError, match="no runs"):
        lr_by_norm.best_lr(r, "gn")


@pytest.mark.parametrize("change, message", [
    ({"norms": ["bn", "batchnorm"]}, "may only contain"),
    ({"norms": []}, "is empty"),
    ({"lrs": []}, "grid 'lrs' is empty"),
    ({"lrs": [0.1, -1.0]}, "positive finite"),
    ({"target_error": 0.0}, "strictly between 0 and 100"),
    ({"target_error": 140}, "strictly between 0 and 100"),
])
def test_lr_by_norm_bad_configs_fail_naming_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        lr_by_norm.runs({**lr_by_norm.PROFILES["cpu"], **change})


# ------------------------------------------------------------------------------------------ small_data


def small_record() -> dict:
    """At 1000 images: BN best at lr 0.1 by validation error (lr 0.3 has the better *test* error, which
    must not choose); no norm at 0.03. Per seed, test errors and eval-mode training errors are known."""
    runs = []
    bn = {0.1: ([20.0, 21.0, 19.5], [22.0, 22.5, 21.0]), 0.3: ([18.0, 18.0, 18.0], [25.0, 25.0, 25.0])}
    none = {0.03: ([26.0, 25.0, 27.5], [26.5, 25.5, 27.0])}
    for norm, cells in (("bn", bn), ("none", none)):
        for lr, (test, val) in cells.items():
            for seed in range(3):
                train = {"bn": 2.0, "none": 0.5}[norm] + seed
                runs.append(run(seed, {"test_error": test[seed], "val_error": val[seed], "train_error_eval": train,
                                       "generalization_gap": test[seed] - train, "diverged": False},
                                norm=norm, n_train=1000, lr=lr))
    return {"config": {"sizes": [1000], "norms": ["bn", "none"]}, "runs": runs}


def test_small_data_readers_choose_lrs_by_validation_and_pair_by_seed():
    r = small_record()
    assert small_data.best_lr(r, "bn", 1000) == 0.1
    assert small_data.at_best(r, "bn", 1000) == {0: 20.0, 1: 21.0, 2: 19.5}
    iv = small_data.paired_gap(r, "none", 1000)
    assert iv.estimate == pytest.approx(((26 - 20) + (25 - 21) + (27.5 - 19.5)) / 3)
    assert (iv.low, iv.high) == pytest.approx((paired_difference([26, 25, 27.5], [20, 21, 19.5]).low,
                                               paired_difference([26, 25, 27.5], [20, 21, 19.5]).high))
    gap = small_data.generalization_gap(r, "bn", 1000)
    assert gap.estimate == pytest.approx((18.0 + 18.0 + 15.5) / 3)  # test minus train error, per seed
    overfit = small_data.paired_gap(r, "none", 1000, metric="generalization_gap")
    assert overfit.estimate == pytest.approx(((25.5 - 18) + (23.5 - 18) + (25 - 15.5)) / 3)
    rows = small_data.table(r)
    assert [row["norm"] for row in rows] == ["bn", "none"] and rows[0]["minus_reference"] is None


def test_small_data_needs_a_grid_for_every_norm():
    config = {**small_data.PROFILES["cpu"], "lrs": {"bn": [0.1], "gn": [0.1], "ln": [0.1]}}
    with pytest.raises(ValueError, match=r"add lrs\['none'\]"):
        small_data.runs(config)
    with pytest.raises(ValueError, match="is empty"):
        small_data.runs({**small_data.PROFILES["cpu"], "lrs": {**config["lrs"], "none": []}})
    with pytest.raises(ValueError, match="one step budget per training-set size"):
        small_data.runs({**small_data.PROFILES["cpu"], "steps": [100]})


# -------------------------------------------------------------------------------------------- bn_depth


def depth_record() -> dict:
    """Depth 10: plain BN reaches the target in 100-200 steps, plain no-norm in 600-1200; at depth 50 the
    plain no-norm net ends at 60% error at every lr, the plain BN net reaches the target at step 50."""
    runs = []
    for seed in range(3):
        for lr in (0.01, 0.1):
            good = lr == 0.1
            runs.append(run(seed, {"test_error": 12.0 if good else 14.0, "diverged": False},
                            {50: 40.0, (100, 200, 100)[seed] if good else 500: 14.0}, arch="plain_bn", depth=10, lr=lr))
            runs.append(run(seed, {"test_error": 13.0 if not good else 70.0, "diverged": False},
                            {50: 40.0, (600, 1200, 900)[seed]: 14.5} if not good else {50: 80.0},
                            arch="plain_none", depth=10, lr=lr))
            runs.append(run(seed, {"test_error": 60.0, "diverged": False}, {50: 80.0}, arch="plain_none", depth=50,
                            lr=lr))
            runs.append(run(seed, {"test_error": 12.0, "diverged": False}, {50: 14.0}, arch="plain_bn", depth=50,
                            lr=lr))
    return {"config": {"target_error": 15.0, "trainable_error": 20.0, "depths": [10, 50],
                       "archs": ["plain_bn", "plain_none"]}, "runs": runs}


def test_bn_depth_readers_on_a_hand_built_record():
    r = depth_record()
    assert bn_depth.best_lr(r, "plain_bn", 10) == 0.1 and bn_depth.best_lr(r, "plain_none", 10) == 0.01
    assert bn_depth.trains(r, "plain_none", 10) and not bn_depth.trains(r, "plain_none", 50)
    assert bn_depth.steps_to_target_at_best(r, "plain_none", 10) == {0: 600, 1: 1200, 2: 900}
    iv = bn_depth.slowdown(r, 10)
    assert iv.estimate == pytest.approx((6 * 6 * 9) ** (1 / 3))
    assert bn_depth.error_gap(r, 10).estimate == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reached the target"):
        bn_depth.slowdown(r, 50)
    rows = {(row["depth"], row["arch"]): row for row in bn_depth.table(r)}
    assert rows[(10, "plain_none")]["steps_to_target"] == 900 and rows[(50, "plain_none")]["trains"] is False


def test_bn_depth_bad_configs_fail_naming_the_fix():
    with pytest.raises(ValueError, match="may only contain"):
        bn_depth.runs({**bn_depth.PROFILES["cpu"], "archs": ["resnet"]})
    with pytest.raises(ValueError, match="positive integers"):
        bn_depth.runs({**bn_depth.PROFILES["cpu"], "depths": [0, 5]})
    with pytest.raises(ValueError, match="grid 'lrs' is empty"):
        bn_depth.runs({**bn_depth.PROFILES["cpu"], "lrs": []})


# --------------------------------------------------------------------------------------- running_stats


def bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return NormCNN("bn", [4, 8], [2, 2], in_channels=1)


def test_cumulative_running_stats_over_the_whole_data_reach_the_population_statistics():
    model, x = bn_net(), torch.randn(96, 1, 8, 8) * 2 + 1
    reference = running_stats.population_stats(model, x.split(16))
    assert running_stats.stat_distance(model, reference) == {"mean_dist": 0.0, "var_dist": 0.0}
    # the same six batches in another order, from reset stats, averaged cumulatively: the same averages
    batches = iter([x[i: i + 16] for i in (80, 0, 48, 16, 64, 32)])
    rows = running_stats.recalibrate(model, batches, None, [1, 6],
                                     lambda: running_stats.stat_distance(model, reference))
    assert rows[0]["mean_dist"] > 0.01 and rows[0]["var_dist"] > 0.01  # one batch is not the population
    assert rows[1]["mean_dist"] < 1e-5 and rows[1]["var_dist"] < 1e-5
    assert not model.training and all(bn.momentum == 0.1 for bn in running_stats.batchnorms(model))


def test_momentum_running_stats_after_one_batch_keep_most_of_the_reset_values():
    model, x = bn_net(), torch.randn(64, 1, 8, 8) * 3 + 5
    running_stats.recalibrate(model, iter(x.split(32)), 0.1, [1], dict)
    first = running_stats.batchnorms(model)[0]
    batch_mean = model[0](x[:32]).mean(dim=(0, 2, 3))
    assert torch.allclose(first.running_mean, 0.1 * batch_mean, atol=1e-5)  # 0.9 * 0 + 0.1 * mean


def rs_record() -> dict:
    """Momentum 0.1 settles within 0.1 points at k=20 for seed 0, k=50 for seed 1 (after a lucky k=5);
    momentum 0.01 never settles for seed 1."""
    curves = {0: {0.1: {1: 80.0, 5: 12.5, 20: 12.05, 50: 11.95, 100: 12.0},
                  0.01: {1: 88.0, 5: 60.0, 20: 30.0, 50: 13.0, 100: 12.1}},
              1: {0.1: {1: 80.0, 5: 13.0, 20: 13.4, 50: 13.1, 100: 13.05},
                  0.01: {1: 88.0, 5: 60.0, 20: 30.0, 50: 14.0, 100: 13.5}}}
    precise = {0: 12.0, 1: 13.0}
    runs = []
    for seed, by_m in curves.items():
        rows = [{"momentum": m, "k": k, "epochs": k / 400, "test_error": e, "mean_dist": 0.0, "var_dist": 0.0}
                for m, c in by_m.items() for k, e in c.items()]
        runs.append(run(seed, {"test_error": precise[seed] + 0.5, "test_error_precise_bn": precise[seed],
                               "steps_per_epoch": 400, "recalibration": rows}))
    return {"config": {"bn_momenta": [0.1, 0.01]}, "runs": runs}


def test_running_stats_readers_on_a_hand_built_record():
    r = rs_record()
    assert running_stats.curve(r, 0.1)[20] == {0: 12.05, 1: 13.4}
    assert running_stats.batches_to_precise(r, 0.1) == {0: 20, 1: 50}
    assert running_stats.epochs_to_precise(r, 0.1) == {0: 20 / 400, 1: 50 / 400}
    assert running_stats.batches_to_precise(r, 0.01) == {0: 100, 1: None}
    assert running_stats.batches_to_precise(r, 0.01, tolerance=1.0) == {0: 50, 1: 50}
    assert running_stats.batches_to_precise(r, 0.1, tolerance="spread") == {0: 5, 1: 5}  # spread = 1.0
    assert running_stats.precise_bn_gap(r).estimate == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no recalibration rows with momentum None"):
        running_stats.curve(r, None)
    with pytest.raises(ValueError, match="points of test error"):
        running_stats.batches_to_precise(r, 0.1, tolerance=-1)


@pytest.mark.parametrize("change, message", [
    ({"ks": []}, "increasing list"), ({"ks": [5, 1]}, "increasing list"), ({"ks": [0, 1]}, "positive"),
    ({"bn_momenta": [0.1, 2.0]}, r"\(0, 1\] or None"), ({"bn_momenta": []}, "non-empty"),
])
def test_running_stats_bad_configs_fail_naming_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        running_stats.runs({**running_stats.PROFILES["cpu"], **change})


# ---------------------------------------------------------------------------------------------- models


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'layernorm'; choose from \('none', 'bn', 'gn', 'ln'\)"):
        activation_norm("layernorm", 16)
    with pytest.raises(ValueError, match="may only contain"):
        lr_by_norm.run_one({"norm": "brn", "lr": 0.1, "seed": 0}, lr_by_norm.PROFILES["smoke"])


def test_layernorm_of_a_conv_map_is_groupnorm_with_one_group():
    ln = [m for m in NormCNN("ln", [8, 16]).modules() if isinstance(m, GroupNorm)]
    assert [m.num_groups for m in ln] == [1, 1]
    assert [m.num_groups for m in NormCNN("gn", [8, 16], groups=8).modules() if isinstance(m, GroupNorm)] == [8, 8]


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_residual_mlp_blocks_start_as_the_identity(norm):
    torch.manual_seed(0)
    net, x = DeepMLP(6, 16, norm, residual=True, in_features=12), torch.randn(8, 12)
    first = torch.relu(net.norms[0](net.linears[0](x)))
    assert torch.allclose(net(x), net.head(first), atol=1e-6)
    plain = DeepMLP(6, 16, norm, residual=False, in_features=12)
    assert not torch.allclose(plain(x), plain.head(torch.relu(plain.norms[0](plain.linears[0](x)))))
