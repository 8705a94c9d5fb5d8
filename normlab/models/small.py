"""The book's small models: plain and normalized CNNs for Fashion-MNIST, and a deep plain MLP.

- `SmallCNN(variant, widths)`: three stride-2 3x3 convolutions with ReLU, global average pooling, a
  linear classifier; `variant` chooses how the convolutions are normalized (`VARIANTS`: none, weight
  norm, weight standardization alone / scaled / with GroupNorm, BatchNorm). Chapter 05.
- `BNConvNet(widths, hidden)`: conv-BN-ReLU blocks with max-pooling and a BatchNorm1d head. Chapter 01.
- `PlainMLP(...)`: `depth` blocks of Linear -> norm -> ReLU with no skip connections, returning every
  block's activations too, for signal propagation at initialization. Chapter 00.
- `NormCNN(norm, widths, strides)`: conv -> norm -> ReLU with any of `NORMS` (none, BN, GN, LN as
  GroupNorm(1, C)); `DeepMLP(depth, width, norm, residual)`: plain or residual MLPs of any depth. The
  claims experiments (`lr_by_norm`, `small_data`, `running_stats`, `bn_depth`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import norms
from ..norms import RELU_GAMMA, BatchNorm1d, BatchNorm2d, LayerNorm

#: How `SmallCNN` normalizes its convolutions.
VARIANTS = ("plain", "wn", "ws", "sws", "ws_gn", "bn")


def conv_block(variant: str, c_in: int, c_out: int, stride: int, groups: int) -> list[nn.Module]:
    """A 3x3 convolution, the variant's normalization, ReLU."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    kw = {"kernel_size": 3, "stride": stride, "padding": 1}
    if variant == "plain":
        layers: list[nn.Module] = [kaiming(nn.Conv2d(c_in, c_out, bias=True, **kw))]
    elif variant == "wn":
        # initialise first: the reparametrization starts from g = ||v||, v = w, the same function as plain
        layers = [norms.weight_norm(kaiming(nn.Conv2d(c_in, c_out, bias=True, **kw)))]
    elif variant == "ws":
        layers = [kaiming(norms.WSConv2d(c_in, c_out, bias=True, **kw))]
    elif variant == "sws":
        # NF-ResNets' scaled WS: W / (sigma sqrt(fan_in)) times the ReLU gain keeps unit-variance signals
        layers = [kaiming(norms.ScaledStdConv2d(c_in, c_out, bias=True, gamma=RELU_GAMMA, **kw))]
    elif variant == "ws_gn":
        # the bias is redundant before a norm that re-centers
        layers = [kaiming(norms.WSConv2d(c_in, c_out, bias=False, **kw)),
                  norms.GroupNorm(min(groups, c_out), c_out)]
    else:  # bn
        layers = [kaiming(nn.Conv2d(c_in, c_out, bias=False, **kw)), norms.BatchNorm2d(c_out)]
    return layers + [nn.ReLU(inplace=True)]


def kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """He et al. (2015) init, N(0, 2 / fan_in), zero bias: a plain ReLU net then keeps its signal's scale.

    Every variant starts from it (for WS variants only the direction matters), so differences come from
    the normalization, not from PyTorch's default init, which shrinks the signal ~2.4x per ReLU layer.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class SmallCNN(nn.Sequential):
    """conv(stride 2) -> conv(stride 2) -> conv(stride 2) -> global average pool -> linear.

    Only the convolutions are normalized; the classifier is a plain `nn.Linear` in every variant.
    """

    def __init__(self, variant: str, widths: list[int], in_channels: int = 1, num_classes: int = 10,
                 groups: int = 8):
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += conv_block(variant, c_in, c_out, stride=2, groups=groups)
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


class BNConvNet(nn.Sequential):
    """Three conv-BN-ReLU blocks (two max-pools), global average pool, linear-BN1d-ReLU, linear."""

    def __init__(self, widths: list[int], hidden: int, in_channels: int = 1, num_classes: int = 10):
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            # no conv bias: BatchNorm's mean subtraction would cancel it
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, hidden, bias=False), BatchNorm1d(hidden),
                   nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)


class PlainMLP(nn.Module):
    """`depth` blocks of Linear -> norm -> ReLU, then a linear classifier. No residual connections."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int, norm: str, sigma_w2: float):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            linear = nn.Linear(in_features if i == 0 else width, width)
            # Biases are zero so the weight variance alone decides the signal's scale.
            nn.init.normal_(linear.weight, std=math.sqrt(sigma_w2 / linear.in_features))
            nn.init.zeros_(linear.bias)
            norm_layer = {"none": nn.Identity, "batchnorm": BatchNorm1d, "layernorm": LayerNorm}[norm]
            layers.append(nn.Sequential(linear, norm_layer(width) if norm != "none" else nn.Identity(), nn.ReLU()))
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        acts = []
        for block in self.blocks:
            x = block(x)
            acts.append(x)
        return self.head(x), acts


#: The activation norms `NormCNN` and `DeepMLP` take (canonical names; for conv maps "ln" is GroupNorm
#: with one group, LayerNorm over (C, H, W) as in Wu & He's comparison).
NORMS = ("none", "bn", "gn", "ln")


def activation_norm(norm: str, channels: int, groups: int = 8, dims: int = 2) -> nn.Module:
    """The norm layer `norm` (one of `NORMS`) for `channels` channels of a conv map (`dims=2`) or of a
    feature vector (`dims=1`). GroupNorm uses `min(groups, channels)` groups; "ln" on a conv map is
    GroupNorm(1, C), on a vector `LayerNorm(C)`."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return BatchNorm2d(channels) if dims == 2 else BatchNorm1d(channels)
    if norm == "ln" and dims == 1:
        return LayerNorm(channels)
    return norms.create_norm("gn", channels, num_groups=1 if norm == "ln" else min(groups, channels))


class NormCNN(nn.Sequential):
    """3x3 convolutions (He init) -> `norm` -> ReLU, global average pool, linear: one net, any norm.

    `widths[i]` channels and stride `strides[i]` (default all 2, as `SmallCNN`) per convolution. The
    convolutions have a bias only without a norm (a norm's beta replaces it). Without a norm the He
    init (`kaiming`) keeps the signal's scale through the ReLUs, so "none" is a fair baseline.
    """

    def __init__(self, norm: str, widths: list[int], strides: list[int] | None = None, in_channels: int = 1,
                 num_classes: int = 10, groups: int = 8):
        strides = [2] * len(widths) if strides is None else list(strides)
        if len(strides) != len(widths):
            raise ValueError(f"give one stride per width ({len(widths)} widths, {len(strides)} strides)")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in zip(widths, strides):
            conv = kaiming(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none"))
            layers += [conv, activation_norm(norm, c_out, groups), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


class DeepMLP(nn.Module):
    """`depth` hidden layers of width `width` on flattened images, plain or residual, with any `NORMS` norm.

    Layer 1 is Linear(in, width) -> norm -> ReLU. Layers 2..depth are, plain, $h \\leftarrow
    \\mathrm{ReLU}(\\mathrm{norm}(W h))$ or, `residual=True`, $h \\leftarrow \\mathrm{ReLU}(h +
    \\mathrm{norm}(W h))$ with the branch starting at zero (its norm's gamma = 0, or W = 0 without a norm:
    each block is the identity at init, as `zero_init_residual` in the ResNets; SkipInit/Fixup's idea
    for residual nets without normalization). Weights have He init, biases zero (bias only without a
    norm). A linear classifier follows, so the net has `depth + 1` linear layers.
    """

    def __init__(self, depth: int, width: int, norm: str = "none", residual: bool = False,
                 in_features: int = 784, num_classes: int = 10):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got {depth} and {width}")
        self.residual = residual
        self.linears = nn.ModuleList(nn.Linear(in_features if i == 0 else width, width, bias=norm == "none")
                                     for i in range(depth))
        self.norms = nn.ModuleList(activation_norm(norm, width, dims=1) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)
        for i, linear in enumerate(self.linears):
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
            if residual and i > 0:  # the branch starts at zero: gamma = 0 behind a norm, else W = 0
                nn.init.zeros_(self.norms[i].weight if norm != "none" else linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norms[0](self.linears[0](x.flatten(1))))
        for linear, norm in zip(self.linears[1:], self.norms[1:]):
            branch = norm(linear(h))
            h = torch.relu(h + branch if self.residual else branch)
        return self.head(h)
