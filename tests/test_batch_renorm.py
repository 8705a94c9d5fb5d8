"""Batch Renormalization: BatchNorm at r_max=1, d_max=0; the test-time output when unclipped; r and d
are constants for backprop (checked against a float64 reference and gradcheck); its schedule; the
variants experiment that uses it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from normlab import stats
from normlab.norms import BatchRenorm2d, GhostBatchNorm2d, batch_renorm, recompute_batchnorm_stats, renorm_schedule


def _pair(k: int, **kw):
    """A BatchRenorm2d with non-trivial affine parameters and running averages, float64."""
    torch.manual_seed(0)
    brn = BatchRenorm2d(3, num_workers=k, dtype=torch.float64, **kw)
    with torch.no_grad():
        brn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        brn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        brn.running_mean.copy_(torch.tensor([0.2, -1.0, 3.0]))
        brn.running_var.copy_(torch.tensor([0.5, 4.0, 9.0]))
    return brn


def reference(x, weight, bias, run_mean, run_var, k, r_max, d_max, eps=1e-5):
    """Ioffe (2017), Algorithm 1, per worker, with r and d computed as constants (no gradient)."""
    b, c, h, w = x.shape
    xg = x.view(k, b // k, c, h, w)
    mean = xg.mean(dim=(1, 3, 4), keepdim=True)
    std = torch.sqrt(((xg - mean) ** 2).mean(dim=(1, 3, 4), keepdim=True) + eps)
    run_std = torch.sqrt(run_var.view(1, 1, c, 1, 1) + eps)
    r = (std / run_std).detach().clamp(1 / r_max, r_max)
    d = ((mean - run_mean.view(1, 1, c, 1, 1)) / run_std).detach().clamp(-d_max, d_max)
    y = (xg - mean) / std * r + d
    return (y * weight.view(1, 1, c, 1, 1) + bias.view(1, 1, c, 1, 1)).view(b, c, h, w)


@pytest.mark.parametrize("k", [1, 4])
def test_without_room_to_correct_it_is_per_worker_batchnorm(k):
    brn = _pair(k, r_max=1.0, d_max=0.0)
    bn = GhostBatchNorm2d(3, num_workers=k, impl="formula", dtype=torch.float64)
    bn.load_state_dict(brn.state_dict())
    x = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = brn(x), bn(x2)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(bn, name), rtol=1e-12, atol=0)
    if k == 1:  # and, on one device, torch's own BatchNorm2d
        ref = nn.BatchNorm2d(3, dtype=torch.float64)
        ref.load_state_dict(_pair(1).state_dict())
        torch.testing.assert_close(ref(x.detach()), y.detach(), rtol=1e-12, atol=1e-12)


def test_unclipped_it_trains_with_the_test_time_output():
    brn = _pair(2, r_max=1e9, d_max=1e9)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 3 - 2
    with torch.no_grad():
        before = copy.deepcopy(brn).eval()(x)  # the running averages before this step's update
    torch.testing.assert_close(brn.train()(x), before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_forward_and_gradients_match_the_reference_with_clipping_active(k):
    brn = _pair(k, r_max=1.5, d_max=0.5)
    x = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 4 + 2).requires_grad_()
    args = (brn.weight, brn.bias, brn.running_mean.clone(), brn.running_var.clone(), k, 1.5, 0.5)
    want = reference(x, *args)
    got = brn(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the chosen running averages make some r and d hit their limits, so clipping is exercised
    xg = x.detach().view(k, -1, 3, 3, 3)
    r = xg.std(dim=(1, 3, 4), unbiased=False) / torch.sqrt(args[3] + 1e-5)
    assert (r > 1.5).any() or (r < 1 / 1.5).any()
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, brn.weight, brn.bias), g)
    want_grads = torch.autograd.grad(want, (x, brn.weight, brn.bias), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the reference's own derivative, numerically, with r and d frozen at this batch's values
    xs = x.detach().view(k, -1, 3, 3, 3)
    run_std = torch.sqrt(args[3].view(1, 1, 3, 1, 1) + 1e-5)
    m0 = xs.mean(dim=(1, 3, 4), keepdim=True)
    s0 = torch.sqrt(xs.var(dim=(1, 3, 4), keepdim=True, unbiased=False) + 1e-5)
    r0 = (s0 / run_std).clamp(1 / 1.5, 1.5)
    d0 = ((m0 - args[2].view(1, 1, 3, 1, 1)) / run_std).clamp(-0.5, 0.5)

    def frozen(x):
        xg = x.view(k, -1, 3, 3, 3)
        mean = xg.mean(dim=(1, 3, 4), keepdim=True)
        std = torch.sqrt(xg.var(dim=(1, 3, 4), keepdim=True, unbiased=False) + 1e-5)
        return ((xg - mean) / std * r0 + d0).view_as(x)

    assert torch.autograd.gradcheck(frozen, (x.detach().clone().requires_grad_(),))
    xr = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(frozen(xr), xr, g * brn.weight.detach().view(1, 3, 1, 1))
    torch.testing.assert_close(grads[0], gx, rtol=1e-10, atol=1e-12)


def test_eval_uses_running_averages_and_state_dict_is_batchnorm2d():
    brn = _pair(2, r_max=1.5, d_max=0.5)
    brn(torch.randn(8, 3, 4, 4, dtype=torch.float64))
    bn = nn.BatchNorm2d(3, dtype=torch.float64)
    bn.load_state_dict(brn.state_dict())
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=1e-12, atol=1e-12)
    assert set(brn.state_dict()) == set(bn.state_dict())


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="r_max >= 1"):
        BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="d_max >= 0"):
        BatchRenorm2d(4, d_max=-1)
    m = BatchRenorm2d(4, num_workers=3)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        m(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match=r"BatchRenorm2d expects \(N, C, H, W\)"):
        m(torch.randn(6, 4, 2))
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(4\) got input .* 5 channels at dim 1"):
        m(torch.randn(6, 5, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel.*each of the 2 workers"):
        BatchRenorm2d(4, num_workers=2)(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="hold"):
        renorm_schedule(1.5, 0.5, hold=0.9, ramp=0.2)


def test_schedule_holds_then_ramps_and_sets_every_layer():
    hook = renorm_schedule(r_max=1.5, d_max=0.5, hold=0.05, ramp=0.2)
    assert hook.limits(0, 1000) == (1.0, 0.0) and hook.limits(50, 1000) == (1.0, 0.0)
    assert hook.limits(150, 1000) == pytest.approx((1.25, 0.25))
    assert hook.limits(250, 1000) == pytest.approx((1.5, 0.5)) and hook.limits(1000, 1000) == pytest.approx((1.5, 0.5))
    model = nn.Sequential(batch_renorm(2, r_max=1.0, d_max=0.0)(3), nn.ReLU(), BatchRenorm2d(3))
    hook(SimpleNamespace(model=model, step=149, total_steps=1000))  # sets the limits of step 150
    assert [(m.r_max, m.d_max) for m in model if isinstance(m, BatchRenorm2d)] == [pytest.approx((1.25, 0.25))] * 2


def test_precise_bn_treats_batch_renorm_as_batchnorm_and_restores_its_limits():
    torch.manual_seed(1)
    data = torch.randn(64, 3, 5, 5) * 2 + 1
    brn = BatchRenorm2d(3, num_workers=4, r_max=1.5, d_max=0.5)
    bn = GhostBatchNorm2d(3, num_workers=4)
    models = [nn.Sequential(nn.Conv2d(3, 3, 3), norm, nn.ReLU(), nn.Conv2d(3, 3, 1), copy.deepcopy(norm))
              for norm in (brn, bn)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m.train()(data[:16])  # running averages away from (0, 1), so BR's r and d would be active
        recompute_batchnorm_stats(m, data.split(32))
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b)
    assert (models[0][1].r_max, models[0][1].d_max, models[0][1].num_workers) == (1.5, 0.5, 4)


def test_variants_experiment_keeps_the_learning_rate_per_image():
    from normlab.experiments import gn_batch_size as base
    from normlab.experiments import gn_batch_size_variants as exp

    cfg = exp.PROFILES["cpu"]
    runs = exp.runs(cfg)
    assert {(r["variant"], r["norm"], r["batch_size"], r["workers"]) for r in runs} == {
        ("brn", "brn", 4, 4), ("single_device", "bn", 32, 1), ("single_device", "gn", 32, 1),
        ("single_device", "bn", 2, 1), ("single_device", "gn", 2, 1)}
    for r in runs:
        tc = base.train_config(r, exp.run_config(r, cfg))
        assert tc.lr / tc.batch_size == pytest.approx(0.1 / 128)  # as k=4 workers of N at lr 0.1*N/32
        assert tc.batch_size == r["workers"] * r["batch_size"]
    brn_cfg = exp.run_config(runs[0], cfg)
    assert brn_cfg["epochs"] == base.PROFILES["cpu_long"]["epochs"]
    for key in ("depth", "width", "image_size", "train_subset", "subset_seed", "gn_groups"):
        assert brn_cfg[key] == base.PROFILES["cpu_long"][key] == base.PROFILES["cpu"][key]


def test_variants_smoke_profile_trains_batch_renorm(tmp_path):
    from normlab import sweep

    record = sweep.sweep("gn_batch_size_variants", "smoke", out=tmp_path / "smoke.json", device="cpu",
                           progress=False, log=None)
    brn = [r for r in record["runs"] if r["config"]["norm"] == "brn"]
    assert len(brn) == 1 and 0 <= brn[0]["metrics"]["test_error"] <= 100
    assert "test_error_precise_bn" in brn[0]["metrics"]
    assert {r["config"]["workers"] for r in record["runs"] if r["config"]["variant"] == "single_device"} == {1}


def test_groups_experiment_repeats_the_cpu_long_protocol():
    from normlab.experiments import gn_batch_size as base
    from normlab.experiments import gn_batch_size_groups as exp

    cfg = exp.PROFILES["cpu"]
    same = lambda c: {k: v for k, v in c.items() if k not in ("group_list", "batch_size")}  # noqa: E731
    assert same(cfg) == same(base.PROFILES["cpu_long"])  # the sweep's seeds too: G=8 repeats its GN runs at N=32
    assert len(cfg["seeds"]) >= stats.MIN_SEEDS
    runs = exp.runs(cfg)
    assert len(runs) == len(cfg["group_list"]) * len(cfg["seeds"])
    for r in runs:  # every G divides every stage's channels, and the run is the cpu_long GN run at G
        assert all((w * cfg["width"]) % r["gn_groups"] == 0 for w in (1, 2, 4))
        layer = base.norm_layer("gn", {**cfg, "gn_groups": r["gn_groups"]})(16)
        assert layer.num_groups == r["gn_groups"]
    assert {"norm": "gn", "batch_size": 32, "seed": 0} in [
        {k: v for k, v in r.items() if k != "gn_groups"} for r in runs if r["gn_groups"] == base.PROFILES["cpu_long"]["gn_groups"]]


def test_capacity_experiment_changes_only_the_model():
    from normlab.experiments import gn_batch_size as base
    from normlab.experiments import gn_batch_size_capacity as exp

    cfg = exp.PROFILES["cpu"]
    same = lambda c: {k: v for k, v in c.items() if k not in ("models", "batch_size")}  # noqa: E731
    assert same(cfg) == same(base.PROFILES["cpu_long"]) and len(cfg["seeds"]) >= stats.MIN_SEEDS
    runs = exp.runs(cfg)
    assert {(r["norm"], r["depth"], r["width"]) for r in runs} == {
        (n, d, w) for n in ("bn", "gn") for d, w in cfg["models"]}
    for d, w in cfg["models"]:  # GN's groups divide every stage of every model; depth is 6n+2
        assert (d - 2) % 6 == 0 and all((m * w) % cfg["gn_groups"] == 0 for m in (1, 2, 4))


def test_precise_bn_samples_every_class_of_a_class_ordered_training_set():
    # CIFAR-10's image folders load class by class: the first 10k images are classes 0 and 1 only.
    from normlab.experiments.gn_batch_size import precise_bn_sample

    labels = torch.arange(10).repeat_interleave(5000)
    pick = precise_bn_sample(len(labels), 10000, seed=1234)
    counts = torch.bincount(labels[pick], minlength=10)
    assert len(set(pick.tolist())) == 10000
    assert counts.min() > 900 and counts.max() < 1100, counts
    assert torch.equal(pick, precise_bn_sample(len(labels), 10000, seed=1234)), "seeded: the same sample every run"
