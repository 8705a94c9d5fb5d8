r"""Normalization layers written from the papers, drop-in compatible with `torch.nn`.

Every layer here computes its statistics with plain tensor reductions: no call into torch's fused
`batch_norm` / `layer_norm` / `group_norm` / `instance_norm` / `rms_norm` kernels (the tests fail if one
sneaks in). Constructor signatures, defaults, parameter and buffer names, train/eval semantics and the
running-statistic updates follow `torch.nn` (torch 2.x), so `load_state_dict(strict=True)` works both ways.

All of them share one numerical choice, `mean_var`: the variance is a **two-pass centered** reduction

$$\mu = \frac{1}{m}\sum_i x_i, \qquad \sigma^2 = \frac{1}{m}\sum_i (x_i - \mu)^2,$$

never $\mathbb{E}[x^2] - \mathbb{E}[x]^2$, which cancels catastrophically when $|\mu| \gg \sigma$ (an input
offset of $10^4$ in float32 leaves $\sigma^2 = 1$ with no correct digits). We do not use
`torch.var_mean` either: its kernel may be a fused one-pass (Welford) reduction whose exact behaviour
depends on the backend; the explicit two passes are simple, stable and autograd-friendly.
Half-precision inputs (float16/bfloat16) are normalized in float32 and cast back, like torch's kernels.

| layer | statistics over | paper |
|---|---|---|
| `BatchNorm1d/2d` | $N$ (and $L$ or $H, W$), per channel | Ioffe & Szegedy 2015 |
| `LayerNorm` | the trailing `normalized_shape` dims, per sample | Ba et al. 2016 |
| `InstanceNorm2d` | $H, W$, per sample and channel | Ulyanov et al. 2016 |
| `GroupNorm` | $C/G$ channels and all spatial dims, per sample | Wu & He 2018 |
| `RMSNorm` | trailing dims, no centering | Zhang & Sennrich 2019 |
| `weight_norm` | the weight: $w = g\,v/\lVert v\rVert$ | Salimans & Kingma 2016 |
| `WSConv2d`, `ScaledStdConv2d` | the conv weight, per output channel | Qiao et al. 2019; Brock et al. 2021 |

Where we deliberately differ from torch: bad inputs raise `ValueError` with a message naming the fix
(torch raises `RuntimeError` from inside its kernels, or only warns for InstanceNorm with a wrong
channel count and `affine=False`).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils import parametrize

__all__ = [
    "mean_var",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm2d",
    "RMSNorm",
    "weight_norm",
    "remove_weight_norm",
    "standardize_weight",
    "WSConv2d",
    "ScaledStdConv2d",
]

_HALF = (torch.float16, torch.bfloat16)


def _opmath(x: Tensor) -> Tensor:
    """Compute statistics of half-precision inputs in float32 (as torch's kernels do)."""
    return x.float() if x.dtype in _HALF else x


def mean_var(x: Tensor, dims: Sequence[int], keepdim: bool = True) -> tuple[Tensor, Tensor]:
    r"""Mean and *biased* variance of `x` over `dims`, by a two-pass centered reduction.

    $\mu = \frac1m\sum_i x_i$, then $\sigma^2 = \frac1m\sum_i (x_i-\mu)^2$. Stable at any offset, unlike
    $\mathbb{E}[x^2]-\mathbb{E}[x]^2$; differentiable by plain autograd.
    """
    dims = tuple(dims)
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=dims, keepdim=keepdim)
    return (mean if keepdim else mean.squeeze(dims)), var


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


# ---------------------------------------------------------------------------------------------------
# BatchNorm and InstanceNorm: per-channel affine, optional running statistics
# ---------------------------------------------------------------------------------------------------


def _register_affine(module: nn.Module, shape, affine: bool, bias: bool, factory: dict) -> None:
    """Register `weight` and `bias` as torch.nn's norms do: parameters, or `None` when switched off."""
    module.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
    module.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)


def _reset_affine(module: nn.Module) -> None:
    """$\\gamma = 1$, $\\beta = 0$: the norm starts as a pure standardization."""
    if module.weight is not None:
        init.ones_(module.weight)
    if module.bias is not None:
        init.zeros_(module.bias)


class _NormBase(nn.Module):
    """Parameters and buffers shared by BatchNorm and InstanceNorm, named and initialised as torch's.

    `weight` ($\\gamma$, ones) and `bias` ($\\beta$, zeros) if `affine`; buffers `running_mean` (zeros),
    `running_var` (ones) and `num_batches_tracked` (long 0) if `track_running_stats`, else registered
    as `None` so the state_dict has exactly torch's keys.
    """

    _version = 2
    _name = "_NormBase"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int "
                             f"(the channel count C of the input), got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _register_affine(self, num_features, affine, bias, factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, batch counter to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; $\\gamma = 1$, $\\beta = 0$."""
        self.reset_running_stats()
        _reset_affine(self)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Checkpoints older than torch 0.4.1 (state_dict version < 2) lack num_batches_tracked.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_channels(self, x: Tensor, channel_dim: int) -> None:
        if x.shape[channel_dim] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape {_shape(x)} with "
                f"{x.shape[channel_dim]} channels at dim {channel_dim}; set num_features="
                f"{x.shape[channel_dim]} or fix the layer before it")

    def _affine(self, y: Tensor, view: Sequence[int]) -> Tensor:
        """$y \\gamma + \\beta$ with the per-channel parameters reshaped to `view`."""
        if self.weight is not None:
            y = y * self.weight.reshape(view)
        if self.bias is not None:
            y = y + self.bias.reshape(view)
        return y

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, var: Tensor, n: int, factor: float) -> None:
        r"""$\hat\mu \leftarrow (1-f)\hat\mu + f\mu_B$, $\hat\sigma^2 \leftarrow (1-f)\hat\sigma^2 + f\,\frac{n}{n-1}\sigma_B^2$.

        `mean`, `var`: per-channel batch mean and *biased* variance, shape `(C,)`; `n`: the number of
        values each statistic was computed from (the unbiased correction $n/(n-1)$ is applied here,
        as torch does); `factor` $f$: `momentum`, or $1/t$ for the cumulative average.
        """
        unbiased = var * (n / (n - 1)) if n > 1 else var
        self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)


class _BatchNorm(_NormBase):
    r"""Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167).

    $$y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta,$$

    with $\mu_B, \sigma_B^2$ the mean and biased variance of each channel over the batch (and the
    spatial positions). In training the running estimates move towards the batch statistics,
    $\hat\mu \leftarrow (1-m)\hat\mu + m\mu_B$ and $\hat\sigma^2 \leftarrow (1-m)\hat\sigma^2 +
    m\frac{n}{n-1}\sigma_B^2$ (unbiased, $n$ values per channel); `momentum=None` uses the cumulative
    average $m = 1/t$ at the $t$-th batch. In eval mode the running estimates replace the batch
    statistics, unless `track_running_stats=False`, in which case batch statistics are used in both modes.

    Subclasses (e.g. a ghost / per-worker BatchNorm) can override `batch_stats` (how `(mean, var)` are
    computed from an input) and `update_running_stats` (how the buffers move), or reshape the input
    and call `normalize`.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def batch_stats(self, x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Batch mean and biased variance over `dims`, kept broadcastable to `x` (two-pass `mean_var`)."""
        return mean_var(x, dims, keepdim=True)

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        r"""$\gamma\,(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta$ for channels at dim 1 of `x`."""
        view = [1, -1] + [1] * (x.dim() - 2)
        return self._affine((x - mean) * torch.rsqrt(var + self.eps), view)

    def _factor(self) -> float:
        """Advance `num_batches_tracked` when training and return the averaging factor (as torch)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        self._check_channels(x, 1)
        if self.training:  # validate before touching any state
            if x.numel() // x.shape[1] == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input of shape "
                    f"{_shape(x)}; use a batch of >=2 samples, eval mode, or GroupNorm/LayerNorm")
            if self.eps <= 0:
                raise ValueError(f"{type(self).__name__}: eps must be positive when training, got {self.eps}")
        factor = self._factor()
        # Batch statistics in training, and in eval when there are no running buffers (as torch).
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats and self.running_mean is not None
        xf = _opmath(x)
        view = [1, -1] + [1] * (x.dim() - 2)
        if use_batch:
            dims = [0] + list(range(2, x.dim()))
            mean, var = self.batch_stats(xf, dims)
            if update:
                self.update_running_stats(mean.reshape(-1), var.reshape(-1), x.numel() // x.shape[1], factor)
        else:
            mean = self.running_mean.reshape(view).to(xf.dtype)
            var = self.running_var.reshape(view).to(xf.dtype)
        return self.normalize(xf, mean, var).to(x.dtype)


class BatchNorm1d(_BatchNorm):
    r"""Batch Normalization over `(N, C)` or `(N, C, L)` inputs (Ioffe & Szegedy 2015).

    $y = \gamma\,(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon} + \beta$, statistics per channel over $N$
    (and $L$). Same signature, defaults, state_dict and semantics as `torch.nn.BatchNorm1d`.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            hint = "; for (N, C, H, W) use BatchNorm2d" if x.dim() == 4 else ""
            raise ValueError(f"BatchNorm1d expects (N, C) or (N, C, L) input, got {x.dim()}-D "
                             f"of shape {_shape(x)}{hint}")


class BatchNorm2d(_BatchNorm):
    r"""Batch Normalization over `(N, C, H, W)` inputs (Ioffe & Szegedy 2015).

    $y = \gamma\,(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon} + \beta$, statistics per channel over
    $N, H, W$. Same signature, defaults, state_dict and semantics as `torch.nn.BatchNorm2d`.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            hint = "; for (N, C, L) or (N, C) use BatchNorm1d" if x.dim() in (2, 3) else ""
            raise ValueError(f"BatchNorm2d expects (N, C, H, W) input, got {x.dim()}-D "
                             f"of shape {_shape(x)}{hint}")


class InstanceNorm2d(_NormBase):
    r"""Instance Normalization (Ulyanov et al. 2016, arXiv:1607.08022).

    $$y_{nchw} = \frac{x_{nchw} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}}\,\gamma_c + \beta_c,$$

    statistics per sample *and* channel over $H, W$: each image's own contrast is removed, which is
    what style transfer wanted. Defaults as torch: `affine=False`, `track_running_stats=False`.
    With `track_running_stats=True`, training updates the running estimates with the batch average of
    the per-instance means and unbiased variances, eval mode uses them, and - unlike BatchNorm -
    `num_batches_tracked` never advances and `momentum=None` leaves the running estimates unchanged
    (torch passes a factor of 0). Accepts `(N, C, H, W)` and unbatched `(C, H, W)`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (3, 4):
            hint = "; for (N, C, L) inputs use GroupNorm(C, C) or LayerNorm" if x.dim() == 2 else ""
            raise ValueError(f"InstanceNorm2d expects (N, C, H, W) or unbatched (C, H, W) input, "
                             f"got {x.dim()}-D of shape {_shape(x)}{hint}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        self._check_channels(x, x.dim() - 3)
        if x.dim() == 3:
            return self._instance_norm(x.unsqueeze(0)).squeeze(0)
        return self._instance_norm(x)

    def _instance_norm(self, x: Tensor) -> Tensor:
        xf = _opmath(x)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            hw = x.shape[2] * x.shape[3]
            if hw == 1:
                raise ValueError(f"Expected more than 1 spatial element when training, got input of shape "
                                 f"{_shape(x)}; InstanceNorm of a 1x1 map is 0 - use BatchNorm or GroupNorm")
            mean, var = mean_var(xf, (2, 3), keepdim=True)
            # torch updates the buffers whenever they exist and input statistics are used.
            if self.running_mean is not None:
                factor = self.momentum if self.momentum is not None else 0.0
                self.update_running_stats(mean.mean(dim=(0, 2, 3)), var.mean(dim=(0, 2, 3)), hw, factor)
        else:
            mean = self.running_mean.reshape(1, -1, 1, 1).to(xf.dtype)
            var = self.running_var.reshape(1, -1, 1, 1).to(xf.dtype)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return self._affine(y, (1, -1, 1, 1)).to(x.dtype)

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, var: Tensor, n: int, factor: float) -> None:
        # Per-instance unbiased variances are averaged over the batch (torch's instance_norm reshapes
        # to (1, N*C, H, W), runs batch norm, and averages the N copies of the updated buffers).
        super().update_running_stats(mean, var, n, factor)


# ---------------------------------------------------------------------------------------------------
# Per-sample norms: LayerNorm, GroupNorm, RMSNorm
# ---------------------------------------------------------------------------------------------------


def _normalized_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _check_trailing(module: nn.Module, x: Tensor, shape: tuple[int, ...]) -> None:
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise ValueError(
            f"{type(module).__name__} with normalized_shape={shape} expects input of shape (*, "
            f"{', '.join(map(str, shape))}), got {_shape(x)}; set normalized_shape to the input's last "
            f"dims (e.g. x.shape[-{k}:]) or move the normalized axes last")


class LayerNorm(nn.Module):
    r"""Layer Normalization (Ba, Kiros & Hinton 2016, arXiv:1607.06450).

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta,$$

    $\mu, \sigma^2$ over the trailing `normalized_shape` dims of *each sample*: no dependence on the
    rest of the batch, hence no running statistics and no train/eval difference. `weight`/`bias` have
    the shape `normalized_shape` (elementwise affine). Same signature as `torch.nn.LayerNorm`,
    including `bias=False`.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        _register_affine(self, self.normalized_shape, elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        _check_trailing(self, x, self.normalized_shape)
        xf = _opmath(x)
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        mean, var = mean_var(xf, dims)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class GroupNorm(nn.Module):
    r"""Group Normalization (Wu & He 2018, arXiv:1803.08494).

    The $C$ channels are split into $G$ groups of $C/G$; each sample's group is normalized over its
    channels and all spatial positions,

    $$y = \frac{x - \mu_{ng}}{\sqrt{\sigma^2_{ng} + \epsilon}}\,\gamma_c + \beta_c,$$

    with a per-channel affine. $G = 1$ is LayerNorm over $(C, H, W)$ (with per-channel affine);
    $G = C$ is InstanceNorm. Input `(N, C, *)`. Same signature as `torch.nn.GroupNorm`.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups != 0:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                f"choose num_groups from {divisors}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        _register_affine(self, num_channels, affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"GroupNorm expects (N, C, *) input, got {x.dim()}-D of shape {_shape(x)}; "
                             f"add a batch dim with x.unsqueeze(0)")
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}) got input of shape {_shape(x)} "
                             f"with {x.shape[1]} channels at dim 1; set num_channels={x.shape[1]}")
        xf = _opmath(x)
        n = x.shape[0]
        grouped = xf.reshape(n, self.num_groups, -1)  # each row: C/G channels x all positions
        mean, var = mean_var(grouped, (2,))
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        view = [1, -1] + [1] * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(view)
        if self.bias is not None:
            y = y + self.bias.reshape(view)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class RMSNorm(nn.Module):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich 2019, arXiv:1910.07467).

    $$y = \frac{x}{\sqrt{\frac1n\sum_i x_i^2 + \epsilon}} \odot \gamma,$$

    LayerNorm without the centering and without a bias. As in torch, $\epsilon$ sits *inside* the
    square root (the paper's code adds it to the RMS), and `eps=None` means the machine epsilon of the
    computation type: `torch.finfo(float32).eps` for float16/bfloat16/float32 inputs,
    `torch.finfo(float64).eps` for float64. Same signature as `torch.nn.RMSNorm`.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_trailing(self, x, self.normalized_shape)
        xf = _opmath(x)
        eps = torch.finfo(xf.dtype).eps if self.eps is None else self.eps
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        y = xf * torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + eps)
        if self.weight is not None:
            y = y * self.weight
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


# ---------------------------------------------------------------------------------------------------
# Normalizing the weights instead of the activations
# ---------------------------------------------------------------------------------------------------


class _WeightNorm(nn.Module):
    r"""The weight-norm reparametrization $w = g\,v/\lVert v\rVert$ (Salimans & Kingma 2016).

    The norm runs over every dim except `dim` (one $g$ per output unit for `dim=0`); `dim=None` (or
    -1, as in torch) normalizes the whole tensor with a scalar $g$. `right_inverse` initialises
    $g = \lVert w\rVert$, $v = w$, so registering it leaves the layer's function unchanged.
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim  # torch's convention: -1 means "whole tensor"

    def _norm(self, v: Tensor) -> Tensor:
        if self.dim == -1:
            return torch.linalg.vector_norm(v)
        dim = self.dim + v.dim() if self.dim < -1 else self.dim
        others = [d for d in range(v.dim()) if d != dim]
        return torch.linalg.vector_norm(v, dim=others, keepdim=True)

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_v * (weight_g / self._norm(weight_v))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Weight normalization (Salimans & Kingma 2016, arXiv:1602.07868): $w = g\,\frac{v}{\lVert v\rVert}$.

    Registers `_WeightNorm` as a parametrization of `module.<name>`, which stores
    `parametrizations.<name>.original0` ($g$) and `.original1` ($v$) exactly like
    `torch.nn.utils.parametrizations.weight_norm`, so state_dicts are interchangeable. Undo it with
    `remove_weight_norm` (that is `parametrize.remove_parametrizations`, keeping the current $w$).
    """
    parametrize.register_parametrization(module, name, _WeightNorm(dim), unsafe=True)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold $g\\,v/\\lVert v\\rVert$ back into a plain parameter: `parametrize.remove_parametrizations`."""
    return parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def standardize_weight(weight: Tensor, eps: float, scaled: bool = False) -> Tensor:
    r"""Standardize a conv/linear weight per output channel over its fan-in (dims 1..).

    `scaled=False`, Weight Standardization (Qiao et al. 2019, arXiv:1903.10520):
    $\hat W = (W - \mu)/\sqrt{\sigma^2 + \epsilon}$.

    `scaled=True`, Scaled WS of NF-ResNets (Brock et al. 2021, arXiv:2101.08692):
    $\hat W = (W - \mu)/(\sigma\sqrt{N})$ with $N$ the fan-in, computed as
    $(W-\mu)\cdot\mathrm{rsqrt}(\max(\sigma^2 N, \epsilon))$ like DeepMind's reference code, so each
    output unit has unit-variance pre-activations for unit-variance inputs. $\mu, \sigma^2$ are the
    biased (two-pass) moments; the caller multiplies by its gain.
    """
    dims = tuple(range(1, weight.dim()))
    mean, var = mean_var(weight, dims)
    if scaled:
        fan_in = weight[0].numel()
        return (weight - mean) * torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    return (weight - mean) * torch.rsqrt(var + eps)


class WSConv2d(nn.Conv2d):
    r"""`nn.Conv2d` with Weight Standardization (Qiao et al. 2019): convolves with
    $\hat W = (W - \mu_o)/\sqrt{\sigma_o^2 + \epsilon}$, moments per output channel $o$ over the fan-in.

    Meant to be paired with GroupNorm (GN+WS) for small-batch training. Same signature as
    `nn.Conv2d` plus `eps`. (Qiao et al.'s code divides by the unbiased std plus 1e-5; we use the biased
    variance inside the square root, like timm's `StdConv2d`.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, eps: float = 1e-5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        return standardize_weight(self.weight, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class ScaledStdConv2d(nn.Conv2d):
    r"""`nn.Conv2d` with Scaled Weight Standardization, the conv of NF-ResNets (Brock et al. 2021):

    $$\hat W = g_o\,\gamma\,\frac{W - \mu_o}{\sigma_o \sqrt{N}},$$

    $N$ the fan-in, $g_o$ a learnable per-output-channel `gain` (shape `(out, 1, 1, 1)` as timm,
    initialised to `gain_init`), $\gamma$ a fixed nonlinearity gain (`gamma`, e.g. 1.7139588594 for ReLU,
    so ReLU outputs keep unit variance). $\epsilon$ as DeepMind's code: $\mathrm{rsqrt}(\max(\sigma^2 N,
    \epsilon))$ with `eps=1e-4`. (timm's current `ScaledStdConv2d` instead uses $\sqrt{\sigma^2+\epsilon}$,
    eps=1e-6, and "same" padding by default; we keep `nn.Conv2d`'s `padding=0`.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, gain_init: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain_init), device=device,
                                            dtype=self.weight.dtype))
        self.gain_init = gain_init
        self.gamma = gamma
        self.eps = eps

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gain"):  # nn.Conv2d.__init__ calls this before `gain` exists
            init.constant_(self.gain, self.gain_init)

    def standardized_weight(self) -> Tensor:
        return self.gain * self.gamma * standardize_weight(self.weight, self.eps, scaled=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}"
