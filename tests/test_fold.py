"""BatchNorm folding (normlab.fold) against the unfolded eval-mode model, at tight tolerances."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normlab.fold import (
    FoldWarning,
    count_batchnorms,
    explain_folding,
    fold_batchnorm,
    fold_bn_into_next_weights,
    fold_weights,
)
from normlab import norms
from normlab.models import resnet


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref|: relative to the output's scale."""
    return ((y - ref).abs().max() / ref.abs().max()).item()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters: the defaults (0, 1, 1, 0) would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith("BatchNorm"):
                c = m.num_features
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_folds(model: nn.Module, x: torch.Tensor, expect_left: int = 0, tol: float = 1e-5, **kw) -> nn.Module:
    """Fold; check the input model is untouched, BNs are gone, and outputs agree to `tol` relative."""
    before = copy.deepcopy(model.state_dict())
    training = model.training
    folded = fold_batchnorm(model, **kw)
    assert state_equal(model.state_dict(), before), "fold_batchnorm modified the input model"
    assert model.training == training
    assert not folded.training
    assert count_batchnorms(folded) == expect_left
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = folded(x)
    model.train(was)
    assert rel_err(out, ref) <= tol
    return folded


# --- the pure function --------------------------------------------------------------------------------

def bn_eval(bn, z):
    """Eval-mode BatchNorm over dim 1 of any rank (the reference the folded layers must match)."""
    return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _bn(c, affine=True, dtype=torch.float64, seed=0):
    bn = randomize_bn(nn.BatchNorm1d(c, affine=affine, eps=1e-3), seed).to(dtype).eval()
    return bn


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_g2", "depthwise", "conv3d",
                                  "convT2d", "convT2d_g2", "convT1d_g3", "nobias", "affine_false"])
def test_fold_weights_matches_layer_then_bn(kind, dtype, tol):
    torch.manual_seed(0)
    affine, bias = kind != "affine_false", kind != "nobias"
    layer, x = {
        "linear": (nn.Linear(5, 6, bias=bias), torch.randn(4, 5)),
        "conv1d": (nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 9)),
        "conv2d": (nn.Conv2d(4, 6, 3, stride=2), torch.randn(2, 4, 9, 9)),
        "conv2d_g2": (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 7, 7)),
        "depthwise": (nn.Conv2d(6, 6, 3, groups=6, padding=1), torch.randn(2, 6, 7, 7)),
        "conv3d": (nn.Conv3d(3, 6, 2), torch.randn(2, 3, 4, 4, 4)),
        "convT2d": (nn.ConvTranspose2d(4, 6, 3, stride=2), torch.randn(2, 4, 5, 5)),
        "convT2d_g2": (nn.ConvTranspose2d(4, 6, 3, groups=2), torch.randn(2, 4, 5, 5)),
        "convT1d_g3": (nn.ConvTranspose1d(6, 6, 3, groups=3, bias=False), torch.randn(2, 6, 5)),
        "nobias": (nn.Conv2d(4, 6, 3, bias=False), torch.randn(2, 4, 7, 7)),
        "affine_false": (nn.Conv2d(4, 6, 3), torch.randn(2, 4, 7, 7)),
    }[kind]
    layer, x = layer.to(dtype), x.to(dtype)
    bn = _bn(6, affine=affine, dtype=dtype)
    z = layer(x)
    ref = bn_eval(bn, z)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    w, b = fold_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                        transposed=transposed, groups=getattr(layer, "groups", 1))
    assert w.dtype == dtype and b.dtype == dtype and w.shape == layer.weight.shape
    folded = copy.deepcopy(layer)
    folded.weight, folded.bias = nn.Parameter(w), nn.Parameter(b)
    assert rel_err(folded(x), ref) <= tol


def test_fold_weights_rejects_mismatched_shapes():
    w = torch.randn(6, 4, 3, 3)
    mean, var = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="fold a BatchNorm only into"):
        fold_weights(w, None, torch.zeros(5), var, 1e-5)
    with pytest.raises(ValueError, match="bias has shape"):
        fold_weights(w, torch.zeros(3), mean, var, 1e-5)
    with pytest.raises(ValueError, match="not divisible by groups"):
        fold_weights(torch.randn(5, 3, 3, 3), None, torch.zeros(9), torch.ones(9), 1e-5, transposed=True, groups=3)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_weights(w, None, None, None, 1e-5)
    with pytest.raises(ValueError, match="groups must be"):
        fold_weights(w, None, mean, var, 1e-5, groups=0)
    with pytest.raises(ValueError, match=">= 2 dims"):
        fold_weights(torch.randn(6), None, mean, var, 1e-5)


def test_torch_transposed_fusion_differs_for_groups():
    """Why the group-aware layout matters: output channel g*(out/groups)+j is column j of group g's rows."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    bn = _bn(6)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w, b = fold_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                        transposed=True, groups=2)
    assert rel_err(F.conv_transpose2d(x, w, b, groups=2), bn_eval(bn, layer(x))) < 1e-12
    # scaling columns by the first out/groups scales only (a groups-blind layout) is wrong:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wrong = layer.weight * s[:3].reshape(1, 3, 1, 1)
    assert rel_err(F.conv_transpose2d(x, wrong, b, groups=2), bn_eval(bn, layer(x))) > 1e-3


# --- BN before a layer ------------------------------------------------------------------------------------

def test_fold_bn_into_next_linear_and_unpadded_conv_is_exact():
    torch.manual_seed(0)
    bn = _bn(4)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    w, b = fold_bn_into_next_weights(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert rel_err(F.linear(x, w, b), lin(bn(x))) < 1e-12
    for groups in (1, 2):
        bn2 = randomize_bn(nn.BatchNorm2d(4), 1).double().eval()
        conv = nn.Conv2d(4, 6, 3, padding=0, groups=groups).double()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        w, b = fold_bn_into_next_weights(conv.weight, conv.bias, bn2.running_mean, bn2.running_var, bn2.eps,
                                         bn2.weight, bn2.bias, groups=groups)
        assert rel_err(F.conv2d(x, w, b, groups=groups), conv(bn2(x))) < 1e-12


def test_fold_bn_into_next_zero_padded_conv_differs_only_at_the_border():
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(4), 1).double().eval()
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w, b = fold_bn_into_next_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    diff = (F.conv2d(x, w, b, padding=1) - conv(bn(x))).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-12  # interior: exact
    assert diff[..., 0, :].min() > 1e-6  # border: BN(0) = β − sμ ≠ 0 is missing from the folded padding


def test_fold_bn_into_next_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        fold_bn_into_next_weights(torch.randn(6, 2, 3, 3), None, torch.zeros(4), torch.ones(4), 1e-5, groups=4)
    with pytest.raises(ValueError, match="input channels"):
        fold_bn_into_next_weights(torch.randn(6, 2, 3, 3), None, torch.zeros(3), torch.ones(3), 1e-5, groups=2)


# --- the graph pass on real models ------------------------------------------------------------------------

@pytest.mark.parametrize("ctor", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_models(ctor):
    torch.manual_seed(0)
    model = randomize_bn(ctor(weights=None)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN in these models is foldable: no warning expected
        check_folds(model, torch.randn(1, 3, 64, 64))


def test_train_mode_model_gives_eval_copy_and_is_left_alone():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).train()
    folded = check_folds(model, torch.randn(1, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in folded.modules())


class LinearBN(nn.Module):
    def __init__(self, c_in=5, c=6, seq=None):
        super().__init__()
        self.fc, self.bn, self.seq = nn.Linear(c_in, c), nn.BatchNorm1d(c), seq

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn1d_folds_on_2d_input_with_example_inputs():
    torch.manual_seed(0)
    model = randomize_bn(LinearBN()).eval()
    x = torch.randn(8, 5)
    check_folds(model, x, example_inputs=x)
    assert explain_folding(model, x)[0].folded


def test_linear_bn1d_without_shapes_is_left_with_a_warning():
    model = randomize_bn(LinearBN()).eval()
    with pytest.warns(FoldWarning, match="pass example_inputs"):
        check_folds(model, torch.randn(8, 5), expect_left=1)


def test_linear_bn1d_on_3d_input_is_not_folded():
    """(N, C, L) input with C == L == out_features: shapes fit, semantics don't; torch.fx's fuse gets it wrong."""
    torch.manual_seed(0)
    model = randomize_bn(LinearBN(c_in=6, c=6)).eval()
    x = torch.randn(4, 6, 6)  # Linear on the last dim (6 -> 6), BN1d on dim 1 (6 channels)
    with pytest.warns(FoldWarning, match="Linear acts on the last dim"):
        check_folds(model, x, expect_left=1, tol=1e-6, example_inputs=x)
    from torch.fx.experimental.optimization import fuse
    with torch.no_grad():
        assert rel_err(fuse(model)(x), model(x)) > 1e-3  # what a shape-blind fold does


@pytest.mark.parametrize("case", ["conv1d", "conv3d", "convT2d", "convT2d_g2", "depthwise", "affine_false"])
def test_small_patterns_fold(case):
    torch.manual_seed(0)
    layer, bn, x = {
        "conv1d": (nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), torch.randn(2, 3, 16)),
        "conv3d": (nn.Conv3d(3, 8, 3, bias=False), nn.BatchNorm3d(8), torch.randn(2, 3, 6, 6, 6)),
        "convT2d": (nn.ConvTranspose2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), torch.randn(2, 3, 6, 6)),
        "convT2d_g2": (nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(8),
                       torch.randn(2, 4, 6, 6)),
        "depthwise": (nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), torch.randn(2, 8, 6, 6)),
        "affine_false": (nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8, affine=False), torch.randn(2, 3, 6, 6)),
    }[case]
    model = randomize_bn(nn.Sequential(layer, bn, nn.ReLU())).eval()
    check_folds(model, x)
    check_folds(model, x, example_inputs=x)


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # y is also used unnormalized: folding would change this use


def test_shared_output_is_left_in_place():
    model = randomize_bn(SharedOutput()).eval()
    with pytest.warns(FoldWarning, match="also used by"):
        check_folds(model, torch.randn(2, 4, 8, 8), expect_left=1, tol=1e-7)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


def test_layer_called_twice_is_not_folded():
    model = randomize_bn(CalledTwice()).eval()
    with pytest.warns(FoldWarning, match="called more than once"):
        check_folds(model, torch.randn(2, 4, 8, 8), expect_left=2, tol=1e-7)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()  # the raw weight is used elsewhere


def test_layer_whose_weight_is_read_elsewhere_is_not_folded():
    model = randomize_bn(ReadsWeight()).eval()
    with pytest.warns(FoldWarning, match="reads the layer's parameters"):
        check_folds(model, torch.randn(2, 4, 8, 8), expect_left=1, tol=1e-7)


def test_untracked_bn_is_left_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    randomize_bn(model).eval()
    with pytest.warns(FoldWarning, match="track_running_stats=False"):
        check_folds(model, torch.randn(2, 3, 10, 10), expect_left=1)


def test_cumulative_momentum_none_uses_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 3 + 1)  # training mode: cumulative average of batch stats
    model.eval()
    assert model[1].num_batches_tracked.item() == 3
    check_folds(model, torch.randn(2, 3, 8, 8))


def test_chain_of_two_bns_folds_both():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))).eval()
    randomize_bn(model[2], seed=5)
    check_folds(model, torch.randn(2, 3, 8, 8))


class ScaledConv(nn.Conv2d):
    """A conv subclass whose forward changes the weight: the folding formula would be wrong for it."""

    def forward(self, x):
        return self._conv_forward(x, self.weight / self.weight.norm(), self.bias)


def test_subclassed_layer_is_not_folded_and_bn_after_relu_is_silent():
    model = randomize_bn(nn.Sequential(ScaledConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_folds(model, torch.randn(2, 3, 8, 8), expect_left=2, tol=1e-7)
    assert [d.folded for d in explain_folding(model)] == [False, False]


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable by torch.fx
            x = -x
        return self.bn(self.conv(x))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="traceable submodules"):
        fold_batchnorm(Dynamic())
    with pytest.raises(ValueError, match="example_inputs must be"):
        fold_batchnorm(LinearBN(), example_inputs={"x": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="expects an nn.Module"):
        fold_batchnorm(lambda x: x)


def test_unbatched_conv1d_is_detected_with_shapes():
    # Conv1d on unbatched (C, L) input gives (C_out, L_out); BatchNorm1d then treats L_out as channels.
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6))).eval()
    x = torch.randn(3, 6)
    with pytest.warns(FoldWarning, match="unbatched"):
        check_folds(model, x, expect_left=1, tol=1e-7, example_inputs=x)


# --- normlab's own layers and models ---------------------------------------------------------------------

def test_normlab_batchnorm_and_resnet20():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norms.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4),
                          norms.BatchNorm1d(4))
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    check_folds(model, x, example_inputs=x)
    for norm_layer in (nn.BatchNorm2d, norms.BatchNorm2d):
        net = randomize_bn(resnet.resnet20(norm_layer=norm_layer)).eval()
        check_folds(net, torch.randn(2, 3, 32, 32))


# --- the benchmark experiment ------------------------------------------------------------------------------

def test_bn_fold_speed_experiment_runs_and_checks_equivalence():
    from normlab.experiments import bn_fold_speed as exp

    assert set(exp.PROFILES) == {"smoke", "cpu", "full"}
    config = {**exp.PROFILES["smoke"], "models": ["resnet20"], "repeats": 1, "warmup": 0}
    (run,) = exp.runs(config)
    threads = torch.get_num_threads()
    m = exp.run_one(run, config, device=torch.device("cpu"))["metrics"]
    assert torch.get_num_threads() == threads  # restored
    assert m["bn_before"] == 19 and m["bn_after_fold"] == 0 and m["bn_after_fx_fuse"] == 0
    assert m["max_rel_err_fold"] <= 1e-5 and m["max_rel_err_fx_fuse"] <= 1e-5
    assert m["fold_over_unfolded"] == pytest.approx(m["fold_median_ms"] / m["unfolded_median_ms"])
    assert 0 < m["bn_time_share"] < 1
    with pytest.raises(ValueError, match="unknown model"):
        exp.build_model("resnet1000")


def test_precision_study_float32_rows():
    from normlab.experiments import bn_fold_speed as exp

    rows = exp.precision_study(dtypes=("float32",), batch=2)
    assert len(rows) == 4 and all(r["rel_err"] <= 1e-5 for r in rows)
