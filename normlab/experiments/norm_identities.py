r"""Exact identities between the norms, and two that are not (claims C10, C13, C20), in float64.

Each check builds the layers of normlab (`impl="normlab"`) and of `torch.nn` (`impl="torch"`), runs
them on the same input and records the largest absolute difference of the outputs. In float64 an
identity shows up as a difference of $10^{-15}$ or so; a non-identity as one of order 1.

**C13** "GN with one group is LayerNorm, with C groups InstanceNorm, and with G = batch BatchNorm".
GroupNorm (Wu & He 2018) normalizes sample $n$'s group $g$ of $C/G$ channels over those channels and
all positions: $\hat x_{nchw} = (x_{nchw} - \mu_{ng})/\sqrt{\sigma^2_{ng} + \epsilon}$.

- $G = 1$: $\mu_n, \sigma_n$ over $(C, H, W)$, exactly LayerNorm with `normalized_shape=(C, H, W)`.
  The affine differs: GroupNorm's $\gamma_c, \beta_c$ are per channel ($2C$ parameters), torch's
  LayerNorm's per element ($2CHW$); LayerNorm reproduces GroupNorm when its $\gamma, \beta$ are
  constant over $H, W$ (`gn1_vs_ln_affine`), not the other way round.
- $G = C$: $\mu_{nc}, \sigma_{nc}$ over $(H, W)$, exactly InstanceNorm.
- BatchNorm's statistics $\mu_c, \sigma_c$ run over $(N, H, W)$: across samples, which no GroupNorm
  ever mixes. `bn_vs_gn` is the difference for every divisor $G$ of $C$, including $G = N$.
  The one coincidence: at $N = 1$ BatchNorm's statistics are InstanceNorm's (C10).

**C10** "BN is undefined at batch size 1". For a conv feature map $(1, C, H, W)$ in training mode
BatchNorm has $HW$ values per channel, so it is defined, and it *is* InstanceNorm of that image
(`bn_b1_vs_in`; a CIFAR ResNet-20 trains forward at batch 1: `resnet_b1_finite`). Only where a channel
has a single value, a fully connected layer's $(1, C)$ or a $1 \times 1$ map, is the variance 0/0:
torch and normlab refuse it in training mode (the messages are recorded) and accept it in eval mode,
which uses the running statistics.

**C20** "BN can be folded into the preceding convolution". In eval mode BN is the affine map
$s_c z + (\beta_c - s_c\mu_c)$, $s_c = \gamma_c/\sqrt{\sigma^2_c + \epsilon}$, which
`normlab.fold.fold_batchnorm` merges into the conv before it. A ResNet-20 gets non-trivial running
statistics (a few training-mode forward passes on shifted, scaled random images, with random
$\gamma, \beta$); then the logits of the folded and the unfolded eval-mode model are compared in
float64 and in float32, and in float32 both against the float64 model, so that the folding error
can be set beside the rounding error the unfolded model makes anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils import seed_all

CLAIMS = ("C13", "C10", "C20")
IMPLS = ("normlab", "torch")

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"batch": 4, "channels": 8, "size": 4, "resnet_depth": 8, "resnet_batch": 4, "resnet_image": 8,
              "stat_passes": 2, "seeds": [0]},
    # seconds on one core
    "cpu": {"batch": 4, "channels": 16, "size": 8, "resnet_depth": 20, "resnet_batch": 32, "resnet_image": 32,
            "stat_passes": 10, "seeds": [0, 1, 2]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"claim": c, "seed": s} for c in CLAIMS for s in config["seeds"]]


def _lib(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    from .. import norms

    return norms if impl == "normlab" else nn


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def feature_map(n: int, c: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """float64 $(N, C, H, W)$ with a different mean and scale per channel and sample (so that batch,
    group and instance statistics all differ)."""
    shift = 3 * torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64)
    scale = torch.rand(n, c, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    return shift + scale * torch.randn(n, c, size, size, generator=gen, dtype=torch.float64)


def divisors(c: int) -> list[int]:
    return [g for g in range(1, c + 1) if c % g == 0]


def check_groups(impl: str, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    """C13: GroupNorm(1) vs LayerNorm(C, H, W), GroupNorm(C) vs InstanceNorm, BatchNorm vs every GroupNorm."""
    lib = _lib(impl)
    n, c, h, w = x.shape
    f64 = {"dtype": torch.float64}
    gn = {g: lib.GroupNorm(g, c, affine=False, **f64) for g in divisors(c)}
    out = {g: m(x) for g, m in gn.items()}
    m: dict[str, Any] = {}
    # G = 1: μ_n, σ²_n over (C, H, W), LayerNorm's statistics
    m["gn1_vs_ln"] = _diff(out[1], lib.LayerNorm([c, h, w], elementwise_affine=False, **f64)(x))
    # the affines: GN's per-channel γ_c, β_c are LN's per-element ones held constant over H, W
    gn1, ln = lib.GroupNorm(1, c, **f64), lib.LayerNorm([c, h, w], **f64)
    with torch.no_grad():
        gn1.weight.copy_(torch.rand(c, generator=gen, **f64) + 0.5)
        gn1.bias.copy_(torch.randn(c, generator=gen, **f64))
        ln.weight.copy_(gn1.weight[:, None, None].expand(c, h, w))
        ln.bias.copy_(gn1.bias[:, None, None].expand(c, h, w))
    m["gn1_vs_ln_affine"] = _diff(gn1(x), ln(x))
    m["gn1_params"] = sum(p.numel() for p in gn1.parameters())
    m["ln_chw_params"] = sum(p.numel() for p in ln.parameters())
    # G = C: μ_nc, σ²_nc over (H, W), InstanceNorm's statistics
    m["gnC_vs_in"] = _diff(out[c], lib.InstanceNorm2d(c, **f64)(x))
    # BatchNorm: μ_c, σ²_c over (N, H, W), across samples; no G gives that
    bn = lib.BatchNorm2d(c, affine=False, **f64).train()(x)
    m["bn_vs_gn"] = {str(g): _diff(bn, y) for g, y in out.items()}
    m["bn_vs_gn_min"] = min(m["bn_vs_gn"].values())
    m["bn_vs_gn_G_equals_N"] = m["bn_vs_gn"].get(str(n))
    m["bn_vs_in"] = _diff(bn, out[c])
    return m


def _error(fn) -> str | None:
    """The `Type: message` of the exception `fn()` raises, or None if it returns."""
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_batch1(impl: str, x: torch.Tensor) -> dict[str, Any]:
    """C10: BatchNorm in training mode at batch 1, on a conv map, a 1x1 map and a (1, C) vector."""
    lib = _lib(impl)
    c = x.shape[1]
    f64 = {"dtype": torch.float64}
    one = x[:1]
    bn = lib.BatchNorm2d(c, **f64).train()
    y = bn(one)
    m: dict[str, Any] = {"bn_b1_finite": bool(torch.isfinite(y).all()),
                         "bn_b1_vs_in": _diff(y, lib.InstanceNorm2d(c, **f64)(one)),
                         "bn_b1_vs_gnC": _diff(y, lib.GroupNorm(c, c, affine=False, **f64)(one)),
                         "bn_b1_running_var_finite": bool(torch.isfinite(bn.running_var).all())}
    vec = one.mean(dim=(2, 3))  # (1, C): one value per channel, as after global pooling
    m["bn1d_b1_error"] = _error(lambda: lib.BatchNorm1d(c, **f64).train()(vec))
    m["bn2d_b1_1x1_error"] = _error(lambda: lib.BatchNorm2d(c, **f64).train()(vec[:, :, None, None]))
    m["bn1d_b1_eval_error"] = _error(lambda: lib.BatchNorm1d(c, **f64).eval()(vec))
    return m


def _bn_resnet(impl: str, config: dict[str, Any]) -> nn.Module:
    from ..models.resnet import CIFARResNet

    return CIFARResNet(config["resnet_depth"], norm_layer=_lib(impl).BatchNorm2d)


def check_fold(impl: str, config: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    """C20: logits of a folded vs an unfolded eval-mode BN ResNet, in float64 and float32."""
    from ..fold import count_batchnorms, fold_batchnorm

    b, s = config["resnet_batch"], config["resnet_image"]
    model = _bn_resnet(impl, config).double()
    with torch.no_grad():
        for mod in model.modules():  # random γ, β: the defaults (1, 0) would hide a wrong fold
            if hasattr(mod, "running_var"):
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.5)
        model.train()
        for _ in range(config["stat_passes"]):  # running statistics far from (0, 1)
            model(2 * torch.randn(b, 3, s, s, generator=gen, dtype=torch.float64) + 0.5)
    x = 2 * torch.randn(b, 3, s, s, generator=gen, dtype=torch.float64) + 0.5
    m: dict[str, Any] = {"bn_layers": count_batchnorms(model)}
    with torch.no_grad():
        truth = model.eval()(x)
        for dtype in (torch.float64, torch.float32):
            unfolded = model.to(dtype)
            folded = fold_batchnorm(unfolded)
            name = str(dtype).removeprefix("torch.")
            ref, y = unfolded(x.to(dtype)).double(), folded(x.to(dtype)).double()
            m[f"{name}_max_abs"] = _diff(y, ref)
            m[f"{name}_max_rel"] = _diff(y, ref) / ref.abs().max().item()
            m[f"{name}_folded_vs_f64"] = _diff(y, truth) / truth.abs().max().item()
            m[f"{name}_unfolded_vs_f64"] = _diff(ref, truth) / truth.abs().max().item()
            m["bn_layers_after_fold"] = count_batchnorms(folded)
        m["logit_scale"] = truth.abs().max().item()
    return m


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    """All checks of one claim, for both implementations (on the CPU: float64 is a CPU check)."""
    if run["claim"] not in CLAIMS:
        raise ValueError(f"unknown claim {run['claim']!r}; choose one of {', '.join(CLAIMS)}")
    metrics: dict[str, Any] = {}
    for impl in IMPLS:
        gen = seed_all(run["seed"])  # both implementations see the same input
        x = feature_map(config["batch"], config["channels"], config["size"], gen)
        if run["claim"] == "C13":
            part = check_groups(impl, x, gen)
        elif run["claim"] == "C10":
            part = check_batch1(impl, x)
        else:
            part = check_fold(impl, config, gen)
        metrics.update({f"{impl}_{k}": v for k, v in part.items()})
    if run["claim"] == "C10":
        model = _bn_resnet("torch", config).train()
        s = config["resnet_image"]
        metrics["resnet_b1_finite"] = bool(torch.isfinite(model(torch.randn(1, 3, s, s, generator=gen))).all())
    return {"metrics": metrics, "history": []}


# ---------------------------------------------------------------------------------------------------
# Readers: the numbers a ledger quotes
# ---------------------------------------------------------------------------------------------------

def _claim_runs(record: dict[str, Any], claim: str, impl: str) -> list[dict[str, Any]]:
    _lib(impl)
    rows = [r["metrics"] for r in record["runs"] if r["config"]["claim"] == claim]
    if not rows:
        raise ValueError(f"the record has no {claim} runs; record norm_identities with a profile that runs {claim}")
    prefix = impl + "_"
    return [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} | {"all": m} for m in rows]


def _worst(rows: list[dict[str, Any]], key: str, pick=max):
    return pick(r[key] for r in rows)


def group_identities(record: dict[str, Any], impl: str = "torch") -> dict[str, float]:
    """C13, worst case over seeds: `gn1_vs_ln`, `gn1_vs_ln_affine`, `gnC_vs_in` (max abs differences,
    ~1e-15 for an identity), `bn_vs_gn_min` (the *smallest* over seeds of BN's distance to the closest
    GroupNorm, O(1): no G is BN), `bn_vs_gn_G_equals_N`, and the parameter counts `gn1_params`, `ln_chw_params`."""
    rows = _claim_runs(record, "C13", impl)
    out = {k: _worst(rows, k) for k in ("gn1_vs_ln", "gn1_vs_ln_affine", "gnC_vs_in")}
    out["bn_vs_gn_min"] = _worst(rows, "bn_vs_gn_min", min)
    out["bn_vs_gn_G_equals_N"] = _worst(rows, "bn_vs_gn_G_equals_N", min)
    out["gn1_params"], out["ln_chw_params"] = rows[0]["gn1_params"], rows[0]["ln_chw_params"]
    return out


def batch_one(record: dict[str, Any], impl: str = "torch") -> dict[str, Any]:
    """C10: `conv_defined` (every seed's batch-1 conv-map output finite), `conv_vs_in` (worst max abs
    difference from InstanceNorm), `fc_error` and `fc_1x1_error` (the training-mode messages for
    (1, C) and (1, C, 1, 1)), `fc_eval_ok` (eval mode accepts (1, C)), `resnet_b1_finite`."""
    rows = _claim_runs(record, "C10", impl)
    return {"conv_defined": all(r["bn_b1_finite"] for r in rows), "conv_vs_in": _worst(rows, "bn_b1_vs_in"),
            "fc_error": rows[0]["bn1d_b1_error"], "fc_1x1_error": rows[0]["bn2d_b1_1x1_error"],
            "fc_eval_ok": all(r["bn1d_b1_eval_error"] is None for r in rows),
            "resnet_b1_finite": all(r["all"]["resnet_b1_finite"] for r in rows)}


def fold_errors(record: dict[str, Any], impl: str = "torch") -> dict[str, float]:
    """C20, worst case over seeds: `float64_max_rel`, `float32_max_rel` (folded vs unfolded logits,
    relative to the largest logit), `float32_folded_vs_f64` and `float32_unfolded_vs_f64` (each float32
    model against the float64 one), `bn_layers` folded and `bn_layers_after_fold` (left)."""
    rows = _claim_runs(record, "C20", impl)
    keys = ("float64_max_abs", "float64_max_rel", "float32_max_abs", "float32_max_rel",
            "float32_folded_vs_f64", "float32_unfolded_vs_f64", "bn_layers", "bn_layers_after_fold")
    return {k: _worst(rows, k) for k in keys}
