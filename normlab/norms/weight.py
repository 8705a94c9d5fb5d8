r"""Normalizing the weights instead of the activations: weight norm, weight standardization, scaled WS.

- `weight_norm` (Salimans & Kingma 2016): $w = g\,v/\lVert v\rVert$, a reparametrization with torch's
  state_dict layout (`parametrizations.weight.original0/1`).
- `WSConv2d` (Qiao et al. 2019): the conv weight standardized per output channel, for GN+WS.
- `ScaledStdConv2d` (Brock et al. 2021): scaled WS, the convolution of normalizer-free ResNets, with
  a nonlinearity gain $\gamma$ so that $\gamma\,g(z)$ has unit variance for $z \sim N(0, 1)$:
  `RELU_GAMMA` for ReLU, `nonlinearity_gamma` for any other function.

None of these is an activation-norm layer; `normlab.norms.create_conv` builds the convolution that
goes with the canonical names `wn`, `ws`, `sws` and `nf`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils import parametrize

from .normalization import mean_var

__all__ = ["RELU_GAMMA", "nonlinearity_gamma", "weight_norm", "remove_weight_norm", "standardize_weight",
           "WSConv2d", "ScaledStdConv2d"]

#: The ReLU's gain gamma = 1 / std(ReLU(z)), z ~ N(0, 1), as in the NF papers' code: a Monte Carlo
#: estimate (`nonlinearity_gamma(torch.relu)` reproduces it to ~0.002). The exact value is
#: sqrt(2 / (1 - 1/pi)) = 1.7129. Multiplying ReLU(z) by gamma gives unit variance, so a scaled-WS
#: convolution after it preserves the variance of the signal.
RELU_GAMMA = 1.7139588594436646


def nonlinearity_gamma(fn: Callable[[Tensor], Tensor], samples: int = 1 << 20,
                       generator: torch.Generator | None = None) -> float:
    """gamma = 1 / sqrt(Var(g(z))) for z ~ N(0, 1), by Monte Carlo as in the NFNets code {cite}`brock2021high`.

    `samples` draws in float64; for ReLU the standard error of gamma is about 0.002 at the default 2^20.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate a variance, got {samples}")
    z = torch.randn(samples, dtype=torch.float64, generator=generator)
    return float(fn(z).var(unbiased=False).rsqrt())


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
        # w = g v / ‖v‖
        return weight_v * (weight_g / self._norm(weight_v))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Weight normalization (Salimans & Kingma 2016, arXiv:1602.07868): $w = g\,\frac{v}{\lVert v\rVert}$.

    Registers `_WeightNorm` as a parametrization of `module.<name>`, which stores
    `parametrizations.<name>.original0` ($g$) and `.original1` ($v$) exactly like
    `torch.nn.utils.parametrizations.weight_norm`, so state_dicts are interchangeable. Undo it with
    `remove_weight_norm` (that is `parametrize.remove_parametrizations`, keeping the current $w$).

    Not scriptable by `torch.jit.script`; `torch.compile(module, fullgraph=True)` is the supported compiler.

    Example:
        >>> lin = weight_norm(nn.Linear(4, 3))
        >>> sorted(lin.state_dict())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
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
    # μ_o, σ²_o over the fan-in of output channel o
    mean, var = mean_var(weight, dims)
    if scaled:
        fan_in = weight[0].numel()
        # Ŵ = (W - μ_o) / √(max(σ²_o N, ε))   (= (W - μ_o) / (σ_o √N) unless σ² N < ε)
        return (weight - mean) * torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    # Ŵ = (W - μ_o) / √(σ²_o + ε)
    return (weight - mean) * torch.rsqrt(var + eps)


class WSConv2d(nn.Conv2d):
    r"""`nn.Conv2d` with Weight Standardization (Qiao et al. 2019): convolves with
    $\hat W = (W - \mu_o)/\sqrt{\sigma_o^2 + \epsilon}$, moments per output channel $o$ over the fan-in.

    Meant to be paired with GroupNorm (GN+WS) for small-batch training. Same signature as
    `nn.Conv2d` plus `eps`. (Qiao et al.'s code divides by the unbiased std plus 1e-5; we use the biased
    variance inside the square root, like timm's `StdConv2d`.)

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C_in, H, W)`
        - Output: `(N, C_out, H_out, W_out)`, as `nn.Conv2d`

    Example:
        >>> conv = WSConv2d(3, 16, 3, padding=1)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
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

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C_in, H, W)`
        - Output: `(N, C_out, H_out, W_out)`, as `nn.Conv2d`

    Example:
        >>> conv = ScaledStdConv2d(16, 16, 3, padding=1, gamma=RELU_GAMMA)
        >>> conv(torch.relu(torch.randn(2, 16, 8, 8))).shape
        torch.Size([2, 16, 8, 8])
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
        # Ŵ = g_o γ (W - μ_o) / (σ_o √N)
        return self.gain * self.gamma * standardize_weight(self.weight, self.eps, scaled=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}"
