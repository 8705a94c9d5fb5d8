"""One vocabulary: the canonical norm names, `create_norm` / `create_conv`, and their users (models, plots)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab import norms, plots
from normlab.models.resnet import CIFARResNet
from normlab.models.transformer import make_norm
from normlab.norms import NORM_NAMES, WEIGHT_NORM_NAMES, canonical_norm_name, create_conv, create_norm

ROOT = Path(__file__).resolve().parents[1]


def test_the_names():
    assert NORM_NAMES == ("none", "bn", "gbn", "brn", "sbn", "ln", "rms", "gn", "in", "wn", "ws", "sws", "nf")
    assert set(WEIGHT_NORM_NAMES) <= set(NORM_NAMES)
    assert set(plots.NORM_COLORS) == set(NORM_NAMES)
    assert len(set(plots.NORM_COLORS.values())) == len(NORM_NAMES)


@pytest.mark.parametrize("name,cls,attrs", [
    ("none", nn.Identity, {}),
    ("bn", norms.BatchNorm2d, {"num_features": 64}),
    ("gbn", norms.GhostBatchNorm2d, {"num_features": 64, "num_workers": 1}),
    ("brn", norms.BatchRenorm2d, {"num_features": 64, "r_max": 3.0}),
    ("sbn", norms.SyncBatchNorm, {"num_features": 64}),
    ("ln", norms.LayerNorm, {"normalized_shape": (64,)}),
    ("rms", norms.RMSNorm, {"normalized_shape": (64,)}),
    ("gn", norms.GroupNorm, {"num_groups": 32, "num_channels": 64}),
    ("in", norms.InstanceNorm2d, {"num_features": 64, "affine": True}),
])
def test_create_norm_builds_each_activation_norm(name, cls, attrs):
    layer = create_norm(name, 64)
    assert type(layer) is cls
    for k, v in attrs.items():
        assert getattr(layer, k) == v, k


def test_create_norm_passes_keywords():
    assert create_norm("gbn", 8, num_workers=4, momentum=None).num_workers == 4
    brn = create_norm("brn", 8, num_workers=2, r_max=1.5, d_max=0.5)
    assert (brn.num_workers, brn.r_max, brn.d_max) == (2, 1.5, 0.5)
    assert create_norm("gn", 16, num_groups=8).num_groups == 8
    assert create_norm("gn", 16, groups=4).num_groups == 4  # timm's spelling
    assert create_norm("in", 8, affine=False).weight is None  # torch's default, on request
    assert create_norm("bn", 8, eps=1e-3).eps == 1e-3


def test_create_norm_gn_explains_a_bad_group_count():
    with pytest.raises(ValueError, match=r"32 groups \(the default, Wu & He's 32\) do not divide 16 channels; "
                                         r"pass num_groups= one of \[1, 2, 4, 8, 16\]"):
        create_norm("gn", 16)
    with pytest.raises(ValueError, match="3 groups do not divide 16"):
        create_norm("gn", 16, num_groups=3)
    with pytest.raises(ValueError, match="not both"):
        create_norm("gn", 16, num_groups=4, groups=8)


def test_ln_is_the_last_dim_layernorm_and_gn1_the_conv_one():
    """`ln` normalizes feature vectors; on (N, C) that is also GroupNorm(1, C), the GN paper's LN."""
    x = torch.randn(5, 12, dtype=torch.float64) * 3 + 1
    ln, gn1 = create_norm("ln", 12, dtype=torch.float64), create_norm("gn", 12, num_groups=1, dtype=torch.float64)
    torch.testing.assert_close(ln(x), gn1(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 12\)"):
        ln(torch.randn(2, 12, 4, 4))  # a conv feature map: use gn with num_groups=1
    assert create_norm("gn", 12, num_groups=1)(torch.randn(2, 12, 4, 4)).shape == (2, 12, 4, 4)


@pytest.mark.parametrize("name", WEIGHT_NORM_NAMES)
def test_weight_normalizations_point_to_create_conv(name):
    with pytest.raises(ValueError, match=rf"'{name}' normalizes the convolution weights.*create_conv\('{name}'"):
        create_norm(name, 16)


def test_create_conv():
    assert type(create_conv("ws", 3, 8, 3)) is norms.WSConv2d
    sws, nf = create_conv("sws", 3, 8, 3, padding=1), create_conv("nf", 3, 8, 3)
    assert type(sws) is type(nf) is norms.ScaledStdConv2d and sws.gamma == nf.gamma == norms.RELU_GAMMA
    assert create_conv("sws", 3, 8, 3, gamma=1.0).gamma == 1.0
    wn = create_conv("wn", 3, 8, 3, bias=False)
    assert "parametrizations.weight.original0" in wn.state_dict() and wn.bias is None
    for name in ("bn", "gn", "none"):
        assert type(create_conv(name, 3, 8, 3)) is nn.Conv2d
    assert create_conv("ws", 3, 8, 3, padding=1)(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)


def test_create_norm_accepts_classes_and_callables():
    assert type(create_norm(nn.BatchNorm2d, 8)) is nn.BatchNorm2d
    gn = create_norm(functools.partial(norms.GroupNorm, 2), 8)
    assert (gn.num_groups, gn.num_channels) == (2, 8)
    assert create_norm(lambda c, **kw: nn.LayerNorm(c, **kw), 8, eps=1e-3).eps == 1e-3
    with pytest.raises(TypeError, match="a name .* or a callable"):
        create_norm(3, 8)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'BatchNorm'; the names are none, bn, gbn, brn, sbn, ln, rms, gn"):
        create_norm("BatchNorm", 8)
    with pytest.raises(ValueError, match="unknown norm 'groupnorm'"):  # no record uses it: not accepted
        canonical_norm_name("groupnorm")


def _recorded_norm_values() -> set[str]:
    values = set()
    for path in ROOT.glob("results/*/*.json"):
        record = json.loads(path.read_text())
        for cfg in [record.get("config", {})] + [r.get("config", {}) for r in record.get("runs", [])]:
            for key in ("norm", "norms"):
                v = cfg.get(key)
                values.update([v] if isinstance(v, str) else v or [])
    return values


def test_every_recorded_norm_spelling_maps_to_a_canonical_name():
    """The spellings accepted besides the canonical names are exactly those recorded results contain."""
    recorded = _recorded_norm_values()
    assert {"bn", "gn", "brn", "layernorm", "rmsnorm", "batchnorm"} <= recorded
    assert {canonical_norm_name(v) for v in recorded} <= set(NORM_NAMES)
    assert set(norms._RECORDED_SPELLINGS) == recorded - set(NORM_NAMES)
    assert plots.color("layernorm") == plots.color("ln") and plots.color("batchnorm") == plots.color("bn")
    assert plots.color("no such norm") == "#333333"


def test_models_accept_a_name_or_a_callable():
    bn = CIFARResNet(8)  # the default: "bn", normlab's BatchNorm2d
    assert {type(m) for m in bn.modules() if "Norm" in type(m).__name__} == {norms.BatchNorm2d}
    plain = CIFARResNet(8, norm_layer="none")
    assert not any("Norm" in type(m).__name__ for m in plain.modules())
    gn = CIFARResNet(8, norm_layer=functools.partial(create_norm, "gn", num_groups=8))
    assert {m.num_groups for m in gn.modules() if isinstance(m, norms.GroupNorm)} == {8}
    assert CIFARResNet(8, norm_layer="gbn")(torch.randn(4, 3, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        CIFARResNet(8, norm_layer="batch")
    with pytest.raises(ValueError, match="create_conv"):
        CIFARResNet(8, norm_layer="ws")
    assert type(make_norm("ln", 16)) is norms.LayerNorm and type(make_norm("rms", 16)) is norms.RMSNorm
    assert type(make_norm("layernorm", 16)) is norms.LayerNorm  # the recorded prepost_ln runs' spelling
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("bn", 16)


def test_every_public_name_of_the_old_modules_imports_from_normlab_norms():
    """normlab.norms was one module, and ghost_bn / batch_renorm were beside it: their names moved here."""
    old = {
        "norms": ["mean_var", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm",
                  "weight_norm", "remove_weight_norm", "standardize_weight", "WSConv2d", "ScaledStdConv2d"],
        "ghost_bn": ["GhostBatchNorm2d", "ghost_batch_norm", "recompute_batchnorm_stats", "per_worker_reference"],
        "batch_renorm": ["BatchRenorm2d", "batch_renorm", "renorm_schedule"],
        "nf": ["RELU_GAMMA", "nonlinearity_gamma"],
    }
    for names in old.values():
        for name in names:
            assert name in norms.__all__ and getattr(norms, name) is not None, name
    from normlab import nf
    assert nf.RELU_GAMMA is norms.RELU_GAMMA and nf.nonlinearity_gamma is norms.nonlinearity_gamma
    assert issubclass(norms.GhostBatchNorm2d, norms.BatchNorm2d) and issubclass(norms.BatchRenorm2d, norms.GhostBatchNorm2d)
    assert not issubclass(norms.GhostBatchNorm2d, nn.BatchNorm2d)  # normlab's own base, not torch's
