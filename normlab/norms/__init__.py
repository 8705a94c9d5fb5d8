r"""Normalization layers written from the papers, drop-in compatible with `torch.nn`.

Every layer here computes its statistics with plain tensor reductions: no call into torch's fused
`batch_norm` / `layer_norm` / `group_norm` / `instance_norm` / `rms_norm` kernels (the tests fail if one
sneaks in; `GhostBatchNorm2d(impl="fused")` is the one explicit exception). Constructor signatures,
defaults, parameter and buffer names, train/eval semantics and the running-statistic updates follow
`torch.nn` (torch 2.x), so `load_state_dict(strict=True)` works both ways. Moments are two-pass
(`mean_var`), half-precision inputs are normalized in float32 and cast back.

| layer | statistics over | paper | module |
|---|---|---|---|
| `BatchNorm1d/2d` | $N$ (and $L$ or $H, W$), per channel | Ioffe & Szegedy 2015 | `batchnorm` |
| `GhostBatchNorm2d` | as BatchNorm2d, per chunk of the batch | Hoffer et al. 2017 | `batchnorm` |
| `BatchRenorm2d` | as GhostBatchNorm2d, corrected towards the running averages | Ioffe 2017 | `batchnorm` |
| `SyncBatchNorm` | as BatchNorm, over the whole process group's batch | Ioffe & Szegedy 2015 | `batchnorm` |
| `InstanceNorm2d` | $H, W$, per sample and channel | Ulyanov et al. 2016 | `batchnorm` |
| `LayerNorm` | the trailing `normalized_shape` dims, per sample | Ba et al. 2016 | `normalization` |
| `GroupNorm` | $C/G$ channels and all spatial dims, per sample | Wu & He 2018 | `normalization` |
| `RMSNorm` | trailing dims, no centering | Zhang & Sennrich 2019 | `normalization` |
| `weight_norm` | the weight: $w = g\,v/\lVert v\rVert$ | Salimans & Kingma 2016 | `weight` |
| `WSConv2d`, `ScaledStdConv2d` | the conv weight, per output channel | Qiao et al. 2019; Brock et al. 2021 | `weight` |

**One vocabulary.** `NORM_NAMES` are the names the package, its experiments' new code and the book's
colours use; `create_norm(name, num_channels, **kw)` builds the activation norm of a name (or calls a
class / callable, as timm's `create_norm_layer`), `create_conv(name, ...)` the convolution that goes
with it. `canonical_norm_name` maps the older spellings that recorded results still contain.

Not scriptable with `torch.jit.script`: the layers are plain, readable Python (f-string errors,
Python-side checks). `torch.compile(layer, fullgraph=True)` is the supported way to compile them.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm2d,
    GhostBatchNorm2d,
    InstanceNorm2d,
    SyncBatchNorm,
    _BatchNorm,
    _NormBase,
    batch_renorm,
    ghost_batch_norm,
    per_worker_reference,
    recompute_batchnorm_stats,
    renorm_schedule,
)
from .normalization import GroupNorm, LayerNorm, RMSNorm, mean_var
from .weight import (
    RELU_GAMMA,
    ScaledStdConv2d,
    WSConv2d,
    nonlinearity_gamma,
    remove_weight_norm,
    standardize_weight,
    weight_norm,
)

__all__ = [
    "NORM_NAMES", "WEIGHT_NORM_NAMES", "canonical_norm_name", "create_norm", "create_conv",
    "mean_var", "BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "GhostBatchNorm2d", "BatchRenorm2d",
    "SyncBatchNorm", "LayerNorm", "GroupNorm", "RMSNorm",
    "ghost_batch_norm", "batch_renorm", "renorm_schedule", "recompute_batchnorm_stats", "per_worker_reference",
    "RELU_GAMMA", "nonlinearity_gamma", "weight_norm", "remove_weight_norm", "standardize_weight",
    "WSConv2d", "ScaledStdConv2d",
]

#: The canonical normalization names: `none`, BatchNorm, ghost (per-worker) BatchNorm, Batch
#: Renormalization, synchronized BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm, then the weight
#: normalizations:
#: weight norm, weight standardization, scaled WS, normalizer-free.
NORM_NAMES = ("none", "bn", "gbn", "brn", "sbn", "ln", "rms", "gn", "in", "wn", "ws", "sws", "nf")
#: The names whose normalization is in the convolution's weights (`create_conv`), not in a norm layer.
WEIGHT_NORM_NAMES = ("wn", "ws", "sws", "nf")
#: Older spellings that recorded results (`results/*/*.json`: signal_propagation, prepost_ln) contain.
_RECORDED_SPELLINGS = {"batchnorm": "bn", "layernorm": "ln", "rmsnorm": "rms"}

#: Wu & He's default number of groups.
GN_GROUPS = 32


def canonical_norm_name(name: str) -> str:
    """`name` if it is canonical, the canonical name of a spelling used by recorded results, else ValueError."""
    if name in NORM_NAMES:
        return name
    if name in _RECORDED_SPELLINGS:
        return _RECORDED_SPELLINGS[name]
    raise ValueError(f"unknown norm {name!r}; the names are {', '.join(NORM_NAMES)}")


def _group_norm(num_channels: int, num_groups: int | None = None, groups: int | None = None, **kw) -> GroupNorm:
    if num_groups is not None and groups is not None and num_groups != groups:
        raise ValueError(f"give num_groups or groups, not both ({num_groups} != {groups})")
    g = num_groups if num_groups is not None else groups if groups is not None else GN_GROUPS
    if g <= 0 or num_channels % g:
        divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
        default = f" (the default, Wu & He's {GN_GROUPS})" if num_groups is None and groups is None else ""
        raise ValueError(f"create_norm('gn', {num_channels}): {g} groups{default} do not divide {num_channels} "
                         f"channels; pass num_groups= one of {divisors}")
    return GroupNorm(g, num_channels, **kw)


def _instance_norm(num_channels: int, affine: bool = True, **kw) -> InstanceNorm2d:
    return InstanceNorm2d(num_channels, affine=affine, **kw)


_ACTIVATION_NORMS: dict[str, Callable[..., nn.Module]] = {
    "none": lambda num_channels: nn.Identity(),
    "bn": BatchNorm2d,
    "gbn": GhostBatchNorm2d,
    "brn": BatchRenorm2d,
    "sbn": SyncBatchNorm,
    "ln": LayerNorm,
    "rms": RMSNorm,
    "gn": _group_norm,
    "in": _instance_norm,
}


def create_norm(norm: str | Callable[..., nn.Module], num_channels: int, **kwargs) -> nn.Module:
    r"""The normalization layer called `norm`, for `num_channels` channels (timm's `create_norm_layer`).

    `norm` is a canonical name (`NORM_NAMES`), or a class / callable / `functools.partial`, which is
    called as `norm(num_channels, **kwargs)`. For names, `kwargs` go to the layer:

    | name | builds | for inputs |
    |---|---|---|
    | `none` | `nn.Identity()` | any |
    | `bn` | `BatchNorm2d(C, **kw)` | `(N, C, H, W)` |
    | `gbn` | `GhostBatchNorm2d(C, **kw)`, e.g. `num_workers=8` | `(kN, C, H, W)` |
    | `brn` | `BatchRenorm2d(C, **kw)`, e.g. `num_workers`, `r_max`, `d_max` | `(kN, C, H, W)` |
    | `sbn` | `SyncBatchNorm(C, **kw)`: statistics over the whole process group (`torchrun`) | `(N, C, *)` |
    | `gn` | `GroupNorm(G, C, **kw)`, `G` = `num_groups` (or `groups`), default 32 as Wu & He | `(N, C, *)` |
    | `in` | `InstanceNorm2d(C, affine=True, **kw)`: per-channel $\gamma, \beta$ like GN with $G = C$ (torch's default is `affine=False`) | `(N, C, H, W)` |
    | `ln` | `LayerNorm(C, **kw)`: over the **last** dim, torch's and timm's `layernorm` | `(*, C)` |
    | `rms` | `RMSNorm(C, **kw)`: over the last dim | `(*, C)` |

    `ln` and `rms` normalize each feature vector (an MLP's `(N, C)` activations, a Transformer's
    `(B, T, C)` tokens), so one name means one layer everywhere. For channels-first conv feature maps,
    the LayerNorm of Wu & He's comparison (statistics over $C, H, W$ per sample) is
    `create_norm("gn", C, num_groups=1)`.

    `wn`, `ws`, `sws`, `nf` normalize the *weights*; there is no norm layer to build, so they raise a
    `ValueError` that points to `create_conv(name, ...)` (and `create_norm("none", C)` for the
    activations, if the network wants a layer there). Unknown names raise a `ValueError` listing the
    valid ones; `batchnorm`, `layernorm`, `rmsnorm` (spellings in recorded results) are accepted.

    Example:
        >>> create_norm("gn", 64)
        GroupNorm(32, 64, eps=1e-05, affine=True, bias=True)
        >>> create_norm("gbn", 16, num_workers=4).num_workers
        4
    """
    if isinstance(norm, str):
        name = canonical_norm_name(norm)
        if name in WEIGHT_NORM_NAMES:
            raise ValueError(f"{name!r} normalizes the convolution weights, not the activations: build the "
                             f"conv with normlab.norms.create_conv({name!r}, in_channels, out_channels, "
                             f"kernel_size) and use create_norm('none', C) where a norm layer would go")
        return _ACTIVATION_NORMS[name](num_channels, **kwargs)
    if callable(norm):
        return norm(num_channels, **kwargs)
    raise TypeError(f"norm must be a name ({', '.join(NORM_NAMES)}) or a callable, got {type(norm).__name__}")


def create_conv(norm: str, in_channels: int, out_channels: int, kernel_size, **kwargs) -> nn.Conv2d:
    """The 2-D convolution that goes with the canonical name `norm` (keyword arguments as `nn.Conv2d`).

    `wn`: `weight_norm(nn.Conv2d(...))`; `ws`: `WSConv2d`; `sws` and `nf`: `ScaledStdConv2d` with the
    ReLU gain (`gamma=RELU_GAMMA` unless given), the convolution of normalizer-free ResNets; any
    activation-norm name: a plain `nn.Conv2d` (the norm is a separate layer, `create_norm`).

    Example:
        >>> create_conv("ws", 3, 16, 3, padding=1)
        WSConv2d(3, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), eps=1e-05)
    """
    name = canonical_norm_name(norm)
    if name == "wn":
        return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs))
    if name == "ws":
        return WSConv2d(in_channels, out_channels, kernel_size, **kwargs)
    if name in ("sws", "nf"):
        return ScaledStdConv2d(in_channels, out_channels, kernel_size, **{"gamma": RELU_GAMMA, **kwargs})
    return nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
