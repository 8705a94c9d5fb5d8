r"""Per-sample normalization layers: LayerNorm, GroupNorm, RMSNorm, and the shared `mean_var`.

None of them depends on the rest of the batch, so they have no running statistics and behave the same
in training and evaluation. Statistics are computed with plain tensor reductions (never torch's fused
`layer_norm` / `group_norm` / `rms_norm` kernels); signatures, defaults, parameters and `repr` follow
`torch.nn`, so state_dicts load both ways.

Every normlab norm computes its moments with `mean_var`, a **two-pass centered** reduction

$$\mu = \frac{1}{m}\sum_i x_i, \qquad \sigma^2 = \frac{1}{m}\sum_i (x_i - \mu)^2,$$

never $\mathbb{E}[x^2] - \mathbb{E}[x]^2$, which cancels catastrophically when $|\mu| \gg \sigma$.
Half-precision inputs (float16/bfloat16) are normalized in float32 and cast back, like torch's kernels.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import init

__all__ = ["mean_var", "LayerNorm", "GroupNorm", "RMSNorm"]

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


def _affine(module: nn.Module, y: Tensor, view: Sequence[int] | None = None) -> Tensor:
    """$y \\gamma + \\beta$, the parameters reshaped to `view` (per channel) or as they are (elementwise)."""
    if module.weight is not None:
        y = y * (module.weight if view is None else module.weight.reshape(view))
    if module.bias is not None:
        y = y + (module.bias if view is None else module.bias.reshape(view))
    return y


def _normalized_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _check_trailing(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise ValueError(
            f"{name} with normalized_shape={shape} expects input of shape (*, "
            f"{', '.join(map(str, shape))}), got {_shape(x)}; set normalized_shape to the input's last "
            f"dims (e.g. x.shape[-{k}:]) or move the normalized axes last")


class LayerNorm(nn.Module):
    r"""Layer Normalization (Ba, Kiros & Hinton 2016, arXiv:1607.06450).

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta,$$

    $\mu, \sigma^2$ over the trailing `normalized_shape` dims of *each sample*: no dependence on the
    rest of the batch, hence no running statistics and no train/eval difference. `weight`/`bias` have
    the shape `normalized_shape` (elementwise affine). Same signature as `torch.nn.LayerNorm`,
    including `bias=False`.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(*, *normalized_shape)`
        - Output: same shape as the input

    Example:
        >>> ln = LayerNorm(8)
        >>> ln(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
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
        _check_trailing(type(self).__name__, x, self.normalized_shape)
        xf = _opmath(x)
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        # μ = 1/m Σᵢ xᵢ,  σ² = 1/m Σᵢ (xᵢ - μ)²   over the trailing dims of each sample
        mean, var = mean_var(xf, dims)
        # x̂ = (x - μ) / √(σ² + ε)
        x_hat = (xf - mean) * torch.rsqrt(var + self.eps)
        # y = γ ⊙ x̂ + β   (elementwise gain and bias)
        return _affine(self, x_hat).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class GroupNorm(nn.Module):
    r"""Group Normalization (Wu & He 2018, arXiv:1803.08494).

    The $C$ channels are split into $G$ groups of $C/G$; each sample's group is normalized over its
    channels and all spatial positions,

    $$y = \frac{x - \mu_{ng}}{\sqrt{\sigma^2_{ng} + \epsilon}}\,\gamma_c + \beta_c,$$

    with a per-channel affine. $G = 1$ is LayerNorm over $(C, H, W)$ (with per-channel affine);
    $G = C$ is InstanceNorm. Same signature as `torch.nn.GroupNorm`. The output (and the input's
    gradient) keep the input's memory format, e.g. `torch.channels_last`, as torch's CPU kernel does.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C, *)`
        - Output: same shape (and memory format) as the input

    Example:
        >>> gn = GroupNorm(2, 6)
        >>> gn(torch.randn(4, 6, 10, 10)).shape
        torch.Size([4, 6, 10, 10])
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
        n, g = x.shape[0], self.num_groups
        # (N, G, C/G, positions): a view of x for contiguous and channels_last inputs alike
        grouped = xf.reshape(n, g, self.num_channels // g, -1)
        # μ_ng, σ²_ng over the C/G channels and all positions of group g of sample n
        mean, var = mean_var(grouped, (2, 3))
        # x̂ = (x - μ_ng) / √(σ²_ng + ε)
        x_hat = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        # y = γ_c x̂ + β_c   (per-channel affine)
        return _affine(self, x_hat, [1, -1] + [1] * (x.dim() - 2)).to(x.dtype)

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

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(*, *normalized_shape)`
        - Output: same shape as the input

    Example:
        >>> rms = RMSNorm(8)
        >>> rms(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
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
        _check_trailing(type(self).__name__, x, self.normalized_shape)
        xf = _opmath(x)
        eps = torch.finfo(xf.dtype).eps if self.eps is None else self.eps
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        # 1 / RMS(x) = 1 / √(1/n Σᵢ xᵢ² + ε)   (ε inside the root, as torch)
        inv_rms = torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + eps)
        # y = x / RMS(x) ⊙ γ   (no centering, no bias)
        y = xf * inv_rms
        if self.weight is not None:
            y = y * self.weight
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
