"""CIFAR ResNet, the fast trainer, per-worker (ghost) BatchNorm and the gn_batch_size experiment."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab import norms
from normlab.norms import GhostBatchNorm2d, ghost_batch_norm, per_worker_reference, recompute_batchnorm_stats
from normlab.models.resnet import BasicBlock, CIFARResNet, ShortcutA, resnet20
from normlab.tasks import random_crop_flip, random_crop_flip_reference


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ ResNet

def test_resnet20_parameter_count_and_shapes():
    m = resnet20(norm_layer=nn.BatchNorm2d)
    assert n_params(m) == 269_722  # He et al. (2016), Table 6: 0.27M (option A shortcuts)
    assert len([x for x in m.modules() if isinstance(x, BasicBlock)]) == 9
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # option B adds two 1x1 projections + norms: 16*32 + 32*64 weights, 2*(32+64) affine parameters
    assert n_params(resnet20(norm_layer=nn.BatchNorm2d, shortcut="B")) == 269_722 + 512 + 2048 + 2 * 96
    feats = {}
    m.blocks[3].register_forward_hook(lambda mod, i, o: feats.update(s2=o.shape))  # returns None
    m.blocks[8].register_forward_hook(lambda mod, i, o: feats.update(s3=o.shape))
    m(torch.randn(2, 3, 32, 32))
    assert feats == {"s2": (2, 32, 16, 16), "s3": (2, 64, 8, 8)}


def test_option_a_shortcut_is_subsample_and_zero_pad():
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, lambda c: nn.GroupNorm(8, c), ghost_batch_norm(2)])
def test_norm_layer_hook_used_everywhere(norm_layer):
    calls = []

    def counting(c):
        calls.append(c)
        return norm_layer(c)

    m = CIFARResNet(20, norm_layer=counting, shortcut="B")
    # stem + 2 per block + 2 option-B projections
    assert len(calls) == 1 + 2 * 9 + 2
    kinds = {type(x) for x in m.modules() if not isinstance(x, (nn.Conv2d, nn.Linear, nn.Sequential, nn.Identity,
                                                                    BasicBlock, CIFARResNet, ShortcutA))}
    assert kinds == {type(norm_layer(16))}
    assert not any(isinstance(x, nn.BatchNorm2d) and type(x) is not type(norm_layer(16)) for x in m.modules())
    assert m(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_normlab_norms_work_in_the_resnet():
    for layer in (norms.BatchNorm2d, lambda c: norms.GroupNorm(8, c)):
        m = CIFARResNet(8, norm_layer=layer, zero_init_residual=True)
        assert m(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_no_norm_and_bad_arguments():
    m = CIFARResNet(8, norm_layer=None)
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.GroupNorm)) for x in m.modules())
    with pytest.raises(ValueError, match="6n\\+2"):
        CIFARResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        CIFARResNet(20, shortcut="C")
    with pytest.raises(ValueError, match="zero_init_residual"):
        CIFARResNet(8, norm_layer=None, zero_init_residual=True)


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, lambda c: nn.GroupNorm(8, c)])
def test_zero_init_makes_every_block_the_identity(norm_layer):
    torch.manual_seed(0)
    m = CIFARResNet(20, norm_layer=norm_layer, zero_init_residual=True)
    x = torch.relu(torch.randn(4, 16, 32, 32))
    for block in m.blocks:
        r = block.residual(x)
        assert r.abs().max() == 0  # residual branch output exactly zero
        y = block(x)
        torch.testing.assert_close(y, torch.relu(block.shortcut(x)), rtol=0, atol=0)
        if isinstance(block.shortcut, nn.Identity):
            torch.testing.assert_close(y, x, rtol=0, atol=0)  # x >= 0, so ReLU(x + 0) = x
        x = y
    # without zero-init the branches are not zero
    m2 = CIFARResNet(20, norm_layer=norm_layer)
    assert m2.blocks[0].residual(torch.randn(2, 16, 8, 8)).abs().max() > 0


# ------------------------------------------------------------------------------------ augmentation

def test_crop_is_a_window_of_the_padded_image_and_flip_is_exact():
    x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    y = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4, flip=False)
    for i in range(len(x)):  # every crop matches exactly one window of its padded image
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # (C, 9, 9, 8, 8)
        hits = (windows == y[i][:, None, None]).all(-1).all(-1).all(0)
        assert hits.sum() >= 1
    g = torch.Generator().manual_seed(2)
    z = random_crop_flip(x, g, padding=0, flip=True)
    flipped = (z != x).flatten(1).any(1)
    torch.testing.assert_close(z[flipped], x[flipped].flip(3), rtol=0, atol=0)
    assert 0 < flipped.sum() < len(x)


def test_vectorized_augmentation_equals_per_sample_loop():
    x = torch.randint(0, 255, (33, 3, 12, 10), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(7), padding=4)
    b = random_crop_flip_reference(x, torch.Generator().manual_seed(7), padding=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_crop_flip(x[0])


# --------------------------------------------------------------------------------------- ghost BN

@pytest.mark.parametrize("impl", ["formula", "fused"])
def test_ghost_bn_with_one_worker_equals_batchnorm2d(impl):
    torch.manual_seed(0)
    x = (torch.randn(8, 5, 4, 3, dtype=torch.float64) * 3 + 2).requires_grad_()
    ref = nn.BatchNorm2d(5).double()
    gbn = GhostBatchNorm2d(5, num_workers=1, impl=impl).double()
    with torch.no_grad():
        for m in (ref, gbn):
            m.weight.copy_(torch.linspace(0.5, 2, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(8, 5, 4, 3, dtype=torch.float64)
    for _ in range(3):  # several steps: the buffers follow torch's EMA exactly
        y_ref, y = ref(x), gbn(x2)
    (y_ref * gy).sum().backward()
    (y * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x2.grad, x.grad * 1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-12)
    sd, sd_ref = gbn.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=1e-12, atol=1e-12)
    gbn.eval(), ref.eval()
    torch.testing.assert_close(gbn(x), ref(x), rtol=1e-12, atol=1e-12)
    # the state_dict loads into a plain BatchNorm2d
    plain = nn.BatchNorm2d(5).double()
    plain.load_state_dict(gbn.state_dict())


@pytest.mark.parametrize("impl", ["formula", "fused"])
@pytest.mark.parametrize("k", [2, 4])
def test_ghost_bn_with_k_workers_equals_k_separate_batchnorms(impl, k):
    torch.manual_seed(1)
    x = (torch.randn(4 * k, 6, 5, 5, dtype=torch.float64) + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gbn = GhostBatchNorm2d(6, num_workers=k, impl=impl).double()
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 1.5)
        gbn.bias.uniform_(-0.5, 0.5)
    refs = [copy.deepcopy(nn.BatchNorm2d(6).double()) for _ in range(k)]
    for r in refs:
        r.load_state_dict({**gbn.state_dict()})
    y = gbn(x)
    y_ref = per_worker_reference(x2, refs)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.weight.grad, sum(r.weight.grad for r in refs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.bias.grad, sum(r.bias.grad for r in refs), rtol=1e-10, atol=1e-12)
    # running stats: the average of the k workers' buffers after one step ("mean")
    torch.testing.assert_close(gbn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(gbn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert int(gbn.num_batches_tracked) == 1


def test_ghost_bn_worker0_running_stats_and_errors():
    torch.manual_seed(2)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    gbn = GhostBatchNorm2d(3, num_workers=4, running_stats="worker0").double()
    ref = nn.BatchNorm2d(3).double()
    gbn(x), ref(x[:2])
    torch.testing.assert_close(gbn.running_mean, ref.running_mean)
    torch.testing.assert_close(gbn.running_var, ref.running_var)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        gbn(torch.randn(6, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_workers"):
        GhostBatchNorm2d(3, num_workers=0)
    with pytest.raises(ValueError, match="running_stats"):
        GhostBatchNorm2d(3, running_stats="median")
    with pytest.raises(ValueError, match="more than 1 value per channel.*each of the 2 workers"):
        GhostBatchNorm2d(3, num_workers=2)(torch.randn(2, 3, 1, 1))


def test_precise_bn_recomputes_population_statistics():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), GhostBatchNorm2d(4, num_workers=2))
    data = torch.randn(64, 3, 8, 8) * 2 + 1
    n = recompute_batchnorm_stats(m, data.split(16))
    assert n == 4 and not m.training
    feats = m[0](data)
    # the average of equal-size batch means is the population mean; vars: mean of unbiased batch vars
    torch.testing.assert_close(m[1].running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    per_batch = torch.stack([f.var(dim=(0, 2, 3)) for f in feats.split(16)]).mean(0)
    torch.testing.assert_close(m[1].running_var, per_batch, rtol=1e-5, atol=1e-5)
    assert m[1].num_workers == 2 and m[1].momentum == 0.1


# ---------------------------------------------------------------------------------- the experiment

def test_gn_batch_size_smoke_profile_records_required_keys(tmp_path, monkeypatch):
    from normlab import sweep
    from normlab.experiments import gn_batch_size

    record = sweep.sweep("gn_batch_size", "smoke", out=tmp_path / "smoke.json", device="cpu",
                           progress=False, log=None)
    runs = record["runs"]
    assert {r["config"]["norm"] for r in runs} == {"bn", "gn"}
    for r in runs:
        assert isinstance(r["config"]["batch_size"], int) and isinstance(r["seed"], int)
        assert 0.0 <= r["metrics"]["test_error"] <= 100.0
        assert r["history"] and "train_loss" in r["history"][-1]
    assert len(runs) == len(gn_batch_size.runs(gn_batch_size.PROFILES["smoke"]))


def test_precise_bn_treats_normlab_batchnorm_like_torch():
    torch.manual_seed(4)
    data = torch.randn(48, 3, 6, 6) * 3 - 1
    got = []
    for bn in (nn.BatchNorm2d(3), norms.BatchNorm2d(3)):
        m = nn.Sequential(bn)
        recompute_batchnorm_stats(m, data.split(16))
        got.append((bn.running_mean.clone(), bn.running_var.clone()))
        assert bn.momentum == 0.1
    torch.testing.assert_close(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1])


def test_gn_batch_size_profiles_are_consistent():
    from normlab.experiments import gn_batch_size as exp
    from normlab.experiments import gn_batch_size_epochs as longer

    for name, cfg in exp.PROFILES.items():
        runs = exp.runs(cfg)
        # every N at the first length; the longer lengths only at the doubling N, if the profile names them
        longer_ns = len(cfg.get("doubling_batch_sizes") or cfg["batch_sizes"])
        cells = len(cfg["batch_sizes"]) + longer_ns * (len(cfg.get("epoch_list") or [None]) - 1)
        assert len(runs) == len(cfg["norms"]) * len(cfg["seeds"]) * cells, name
        assert len({json_key(r) for r in runs}) == len(runs)
        for n in cfg["batch_sizes"]:  # GN groups divide every stage's channels; workers split the batch
            assert all((w * cfg["width"]) % cfg["gn_groups"] == 0 for w in (1, 2, 4))
            assert exp.train_config({"norm": "bn", "batch_size": n, "seed": 0}, cfg).batch_size == cfg["workers"] * n
        assert exp.train_config({"norm": "gn", "batch_size": 32, "seed": 0}, cfg).lr == pytest.approx(cfg["base_lr"])
    assert all(r["epochs"] == 20 for r in longer.runs(longer.PROFILES["cpu"]))
    converged = exp.runs(exp.PROFILES["cpu_converged"])
    assert [r["epochs"] for r in converged] == [30] * 30 + [60] * 12 + [120] * 12  # the shorter runs first
    assert {r["batch_size"] for r in converged if r["epochs"] == 60} == {32, 2}  # doubling only where judged
    assert [r["seed"] for r in longer.runs(longer.PROFILES["cpu"])][:4] == [0] * 4  # seed-major order
    with pytest.raises(ValueError, match="norm must be"):
        exp.norm_layer("ln", exp.PROFILES["smoke"])
    with pytest.raises(ValueError, match="dataset"):
        exp.load_data({**exp.PROFILES["smoke"], "dataset": "mnist", "subset_seed": -1})


def json_key(run):
    import json
    return json.dumps(run, sort_keys=True)
