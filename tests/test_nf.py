"""Tests of normlab.nf: scaled WS, NF-ResNet alpha/beta bookkeeping, AGC, signal propagation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.norms
from normlab import nf
from normlab.models.resnet import CIFARResNet

RELU_GAMMA_EXACT = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))  # 1 / std(ReLU(z)), z ~ N(0, 1)


# ---------------------------------------------------------------------------------------------------
# Scaled weight standardization


def test_scaled_std_conv_is_shared_with_norms():
    assert nf.ScaledStdConv2d is normlab.norms.ScaledStdConv2d
    assert nf.standardize_weight is normlab.norms.standardize_weight


def test_relu_gamma():
    # The papers' constant is a Monte-Carlo estimate of the exact 1 / std(ReLU(z)).
    assert nf.RELU_GAMMA == pytest.approx(RELU_GAMMA_EXACT, abs=2e-3)
    est = nf.nonlinearity_gamma(torch.relu, generator=torch.Generator().manual_seed(0))
    assert est == pytest.approx(RELU_GAMMA_EXACT, abs=5e-3)
    assert nf.nonlinearity_gamma(lambda z: z, generator=torch.Generator().manual_seed(0)) == pytest.approx(1.0, abs=5e-3)
    with pytest.raises(ValueError, match="samples"):
        nf.nonlinearity_gamma(torch.relu, samples=1)


def test_scaled_ws_weight_moments_per_output_unit():
    """Each output row of W-hat has zero mean and variance gain^2 gamma^2 / fan_in."""
    torch.manual_seed(0)
    conv = nf.ScaledStdConv2d(6, 5, 3, gamma=nf.RELU_GAMMA, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None, None, None])  # offsets
        conv.gain.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)[:, None, None, None])
    w = conv.standardized_weight().detach().flatten(1)
    fan_in = 6 * 3 * 3
    gain = conv.gain.detach().flatten()
    torch.testing.assert_close(w.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), gain**2 * nf.RELU_GAMMA**2 / fan_in, rtol=1e-12, atol=0)


def test_scaled_ws_conv_matches_formula_reference():
    """The module convolves with W-hat = gain * gamma * (W - mean) / (std * sqrt(fan_in)), plus bias."""
    torch.manual_seed(1)
    conv = nf.ScaledStdConv2d(4, 3, 3, stride=2, padding=1, gamma=nf.RELU_GAMMA, dtype=torch.float64)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
        conv.bias.normal_()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w = conv.weight.detach()
    ref_w = torch.empty_like(w)
    for o in range(w.shape[0]):  # one output unit at a time, straight from the formula
        row = w[o]
        n = row.numel()
        mean = row.sum() / n
        std = math.sqrt(float(((row - mean) ** 2).sum()) / n)
        ref_w[o] = conv.gain[o, 0, 0, 0].item() * nf.RELU_GAMMA * (row - mean) / (std * math.sqrt(n))
    ref = F.conv2d(x, ref_w, conv.bias.detach(), stride=2, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# NF-ResNet


def test_nf_resnet_alpha_beta_bookkeeping():
    alpha = 0.2
    model = nf.NFResNet(depth=20, alpha=alpha)
    a2 = alpha**2
    # stage 1 has no projection (16 -> 16): the variance keeps growing from the stem's 1;
    # stages 2 and 3 start with a transition block whose projection shortcut resets it to 1 + alpha^2.
    expected = [1, 1 + a2, 1 + 2 * a2, 1 + 3 * a2, 1 + a2, 1 + 2 * a2, 1 + 3 * a2, 1 + a2, 1 + 2 * a2]
    assert model.expected_var == pytest.approx(expected, rel=1e-12)
    assert [b.beta for b in model.blocks] == pytest.approx([math.sqrt(v) for v in expected], rel=1e-12)
    assert [b.projection for b in model.blocks] == [False] * 3 + [True, False, False] * 2
    assert all(b.alpha == alpha for b in model.blocks)


def test_nf_resnet_variance_tracks_the_analytic_prediction():
    """At init, on unit-variance i.i.d. inputs, each block's input variance is close to expected_var.

    Slightly below it: zero padding drops taps at the image border (about 4% of the variance of a 3x3
    conv at 32x32, more at the 8x8 of stage 3), which the analytic bookkeeping ignores."""
    torch.manual_seed(0)
    model = nf.NFResNet(depth=20, width=32, alpha=0.5)  # a large alpha makes the growth visible
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].var().item())) for b in model.blocks]
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for h in hooks:
        h.remove()
    ratio = torch.tensor(seen) / torch.tensor(model.expected_var)
    assert ratio.min() > 0.85 and ratio.max() < 1.02, ratio


def test_nf_block_branch_preserves_unit_variance():
    torch.manual_seed(0)
    block = nf.NFBlock(64, 64, alpha=0.2, beta=2.0)
    x = 2.0 * torch.randn(8, 64, 32, 32)  # variance beta^2: the block divides it back to 1
    with torch.no_grad():
        # unit variance but for the taps zero padding drops at the border (~4% per 3x3 conv at 32x32)
        assert 0.85 < block.residual(x).var().item() < 1.02
        y = block(x)
    torch.testing.assert_close(y, x + 0.2 * block.residual(x).detach())
    with torch.no_grad():
        block.alpha = 0.0
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_nf_resnet_forward_backward_and_errors():
    model = nf.nf_resnet20(num_classes=7, in_channels=1, width=4)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for bad in ({"depth": 21}, {"alpha": -0.1}, {"width": 0}):
        with pytest.raises(ValueError):
            nf.NFResNet(**bad)
    with pytest.raises(ValueError, match="beta"):
        nf.NFBlock(4, 4, beta=0.0)


def test_preact_resnet():
    torch.manual_seed(0)
    model = nf.PreActResNet(depth=14, norm_layer=None, width=4)
    x = torch.randn(2, 3, 8, 8)
    b = model.blocks[2]  # a transition block with a 1x1 projection
    h = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(b(h), b.shortcut(h) + b.conv2(F.relu(b.conv1(F.relu(h)))))
    # ResNet-V2: bare conv stem, blocks, final norm + ReLU, pooling, classifier
    ref = model.fc(F.relu(model.blocks(model.conv1(x))).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), ref)
    bn = nf.PreActResNet(depth=8, width=4)
    assert isinstance(bn.norm1, nn.Identity) and bn.final_norm.num_features == 16
    assert CIFARResNet(depth=8, block=nf.PreActBlock, width=4)(x).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------
# Adaptive gradient clipping


def _agc_reference(params, clip, eps):
    """Plain-loop AGC, one unit at a time, with Python floats."""
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.detach().double().clone()
        if w.squeeze().dim() <= 1:
            units = [(slice(None),)]
        else:
            units = [(i,) for i in range(w.shape[0])]
        for u in units:
            w_norm = math.sqrt(float((w[u] ** 2).sum()))
            g_norm = math.sqrt(float((g[u] ** 2).sum()))
            max_norm = clip * max(w_norm, eps)
            if g_norm > max_norm:
                g[u] = g[u] * (max_norm / g_norm)
        out.append(g)
    return out


def _toy_params(grad_scale: float):
    torch.manual_seed(0)
    conv = nf.ScaledStdConv2d(3, 4, 3, dtype=torch.float64)
    lin = nn.Linear(5, 6, dtype=torch.float64)
    nn.init.zeros_(lin.bias)  # a zero parameter: eps sets its allowed norm
    params = [conv.weight, conv.bias, conv.gain, lin.weight, lin.bias]
    for i, p in enumerate(params):
        # per-unit gradient scales spanning "far below" to "far above" the threshold
        scale = torch.logspace(-4, 1, p.shape[0], dtype=torch.float64).view(-1, *[1] * (p.dim() - 1))
        p.grad = torch.randn_like(p) * scale * grad_scale
    return params


def test_agc_leaves_small_gradients_untouched():
    params = _toy_params(grad_scale=1e-7)
    before = [p.grad.clone() for p in params]
    frac = nf.adaptive_grad_clip_(params, clip=0.01, eps=1e-3)
    assert frac == 0.0
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_agc_clips_large_gradients_to_exactly_lambda_times_weight_norm():
    params = _toy_params(grad_scale=1e3)
    clip, eps = 0.02, 1e-3
    frac = nf.adaptive_grad_clip_(params, clip=clip, eps=eps)
    assert frac == 1.0
    for p in params:
        g_norm = nf.unitwise_norm(p.grad)
        w_norm = nf.unitwise_norm(p.detach()).clamp_min(eps)
        torch.testing.assert_close(g_norm, clip * w_norm, rtol=1e-12, atol=0)
    # the zero-initialized bias is held to clip * eps, not frozen
    assert nf.unitwise_norm(params[4].grad).item() == pytest.approx(clip * eps, rel=1e-12)


def test_agc_matches_plain_loop_reference():
    params = _toy_params(grad_scale=1.0)  # a mix of clipped and untouched units
    ref = _agc_reference(params, clip=0.05, eps=1e-3)
    frac = nf.adaptive_grad_clip_(params, clip=0.05, eps=1e-3)
    assert 0.0 < frac < 1.0
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_unitwise_norm_units():
    w = torch.arange(24.0).view(4, 3, 2, 1)
    torch.testing.assert_close(nf.unitwise_norm(w).flatten(), w.flatten(1).norm(dim=1))
    v = torch.arange(5.0)
    assert nf.unitwise_norm(v).dim() == 0 and nf.unitwise_norm(v).item() == pytest.approx(v.norm().item())
    g = torch.ones(4, 1, 1, 1)  # a timm-style per-channel gain is one unit, like the reference's (O,) gain
    assert nf.unitwise_norm(g).item() == pytest.approx(2.0)


def test_agc_bad_arguments_and_parameter_selection():
    p = nn.Parameter(torch.ones(3, 3))
    p.grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match="clip"):
        nf.adaptive_grad_clip_([p], clip=0.0)
    with pytest.raises(ValueError, match="eps"):
        nf.adaptive_grad_clip_(p, eps=0.0)
    model = nf.NFResNet(depth=8, width=2)
    chosen = {id(q) for q in nf.agc_parameters(model)}
    assert id(model.fc.weight) not in chosen and id(model.fc.bias) not in chosen
    assert len(chosen) == len(list(model.parameters())) - 2
    with pytest.raises(ValueError, match="named_modules"):
        nf.agc_parameters(model, exclude=("head",))


# ---------------------------------------------------------------------------------------------------
# Signal propagation


def test_signal_propagation_matches_manual_statistics():
    torch.manual_seed(0)
    model = nf.NFResNet(depth=14, width=4)
    x = torch.randn(8, 3, 8, 8)
    spp = nf.signal_propagation(model, x)
    with torch.no_grad():
        h = model.conv1(x)
        for i, block in enumerate(model.blocks):
            r = block.residual(h)
            h = block(h)
            mean = h.double().mean(dim=(0, 2, 3))
            var = h.double().var(dim=(0, 2, 3), unbiased=False)
            assert spp["avg_sq_mean"][i] == pytest.approx((mean**2).mean().item(), rel=1e-9)
            assert spp["avg_var"][i] == pytest.approx(var.mean().item(), rel=1e-9)
            assert spp["res_var"][i] == pytest.approx(r.double().var(dim=(0, 2, 3), unbiased=False).mean().item(), rel=1e-9)
    assert len(spp["avg_var"]) == len(model.blocks)
    with pytest.raises(ValueError, match="blocks"):
        nf.signal_propagation(nn.Linear(3, 3), x)
    with pytest.raises(ValueError, match="N, C, H, W"):
        nf.signal_propagation(model, x.flatten(1))


def test_signal_propagation_nf_stays_bounded_where_unnormalized_explodes():
    """The paper's claim at init: without normalization the variance of a pre-activation ResNet grows
    exponentially with depth; NF-ResNets keep it at 1 + k alpha^2 (reset at transitions)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    plain = nf.signal_propagation(nf.PreActResNet(depth=32, norm_layer=None, width=8), x)
    nfnet = nf.NFResNet(depth=32, width=8)
    nfs = nf.signal_propagation(nfnet, x)
    blocks = len(plain["avg_var"])
    growth_per_block = (plain["avg_var"][-1] / plain["avg_var"][0]) ** (1 / (blocks - 1))
    assert growth_per_block > 1.3  # exponential: about 1.5x per block here
    assert max(nfs["avg_var"]) < 2.0 and min(nfs["avg_var"]) > 0.5


def test_plot_signal_propagation_draws_each_model_in_each_panel():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spp = {"avg_sq_mean": [0.1, 0.2], "avg_var": [1.0, 1.04], "res_var": [1.0, 1.0]}
    axes = nf.plot_signal_propagation({"nf": spp, "bn": spp}, log=False)
    assert len(axes) == 3 and all(len(ax.lines) == 2 for ax in axes)
    assert list(axes[1].lines[0].get_ydata()) == spp["avg_var"] and axes[0].get_yscale() == "linear"
    plt.close("all")


# ---------------------------------------------------------------------------------------------------
# The experiment


def test_nf_resnet_experiment_runs_and_validation():
    from normlab.experiments import nf_resnet as exp

    runs = exp.runs(exp.PROFILES["smoke"])
    assert [r["kind"] for r in runs].count("spp") == 4 and all("seed" in r for r in runs)
    assert {(r["model"], r.get("lr")) for r in runs if r["kind"] == "train"} >= {("nf", 0.8), ("nf_noagc", 0.8)}
    with pytest.raises(ValueError, match="unknown train model"):
        exp.runs({**exp.PROFILES["smoke"], "train": [["layernorm", 0.1]]})
    with pytest.raises(ValueError, match="kind"):
        exp.run_one({"kind": "other", "model": "nf", "seed": 0}, exp.PROFILES["smoke"])


def test_nf_resnet_experiment_records_divergence(monkeypatch):
    """A run that blows up stops at once, is marked diverged, and leaves JSON-safe numbers only."""
    import json

    from normlab.experiments import nf_resnet as exp

    n = 64
    gen = torch.Generator().manual_seed(0)
    fake = (torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n) % 10,
            torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n) % 10)
    monkeypatch.setattr(exp, "_split", lambda config, seed: fake)
    config = {**exp.PROFILES["smoke"], "train_size": n, "test_size": n, "batch_size": 16, "epochs": 2, "width": 4}
    out = exp.run_one({"kind": "train", "model": "nf_noagc", "lr": 1e6, "seed": 0}, config)
    assert out["metrics"]["diverged"] and out["metrics"]["diverged_step"] < 8
    assert out["history"][-1]["diverged"]
    json.dumps(out, allow_nan=False)  # raises on NaN/inf
    ok = exp.run_one({"kind": "train", "model": "nf", "lr": 0.1, "seed": 0}, {**config, "epochs": 1})
    assert not ok["metrics"]["diverged"] and 0 < ok["metrics"]["agc_clip_fraction"] <= 1
    assert ok["history"][0]["agc_clip_fraction"] == pytest.approx(ok["metrics"]["agc_clip_fraction"], abs=1e-4)
    json.dumps(ok, allow_nan=False)
