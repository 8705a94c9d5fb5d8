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
| `InstanceNorm2d` | $H, W$, per sample and channel | Ulyanov et al. 2016 | `batchnorm` |
| `LayerNorm` | the trailing `normalized_shape` dims, per sample | Ba et al. 2016 | `normalization` |
| `GroupNorm` | $C/G$ channels and all spatial dims, per sample | Wu & He 2018 | `normalization` |
| `RMSNorm` | trailing dims, no centering | Zhang & Sennrich 2019 | `normalization` |
| `weight_norm` | the weight: $w = g\,v/\lVert v\rVert$ | Salimans & Kingma 2016 | `weight` |
| `WSConv2d`, `ScaledStdConv2d` | the conv weight, per output channel | Qiao et al. 2019; Brock et al. 2021 | `weight` |

Not scriptable with `torch.jit.script`: the layers are plain, readable Python (f-string errors,
Python-side checks). `torch.compile(layer, fullgraph=True)` is the supported way to compile them.
"""

from __future__ import annotations

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm2d,
    GhostBatchNorm2d,
    InstanceNorm2d,
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
    "mean_var", "BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "GhostBatchNorm2d", "BatchRenorm2d",
    "LayerNorm", "GroupNorm", "RMSNorm",
    "ghost_batch_norm", "batch_renorm", "renorm_schedule", "recompute_batchnorm_stats", "per_worker_reference",
    "RELU_GAMMA", "nonlinearity_gamma", "weight_norm", "remove_weight_norm", "standardize_weight",
    "WSConv2d", "ScaledStdConv2d",
]
