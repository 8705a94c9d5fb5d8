"""The CIFAR ResNets of He et al. (2016), with a pluggable normalization layer.

He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016 {cite}`he2016deep`,
Section 4.2: a 3x3 stem with 16 channels, then three stages of $n$ basic blocks at 32x32, 16x16 and
8x8 resolution with 16, 32 and 64 channels, global average pooling and a linear classifier; depth
$6n+2$ (ResNet-20/32/44/56/110 for $n = 3/5/7/9/18$). A basic block computes

$$ y = \\mathrm{ReLU}\\big(x' + \\mathrm{norm}_2(W_2 * \\mathrm{ReLU}(\\mathrm{norm}_1(W_1 * x)))\\big), $$

with $x'$ the shortcut. The paper's CIFAR networks use **option A** shortcuts: when a stage halves the
resolution and doubles the width, the shortcut subsamples with stride 2 and pads the new channels with
zeros, so it has no parameters (ResNet-20: 0.27M parameters). **Option B** uses a 1x1 convolution +
norm projection there instead (the ImageNet ResNets' choice, and torchvision's).

`norm_layer` is the same hook as torchvision's ResNets: a callable `norm_layer(num_channels) ->
nn.Module`, used for every normalization in the network (stem, both norms of each block, option-B
projections), or a canonical norm name (`normlab.norms.NORM_NAMES`: `"bn"`, `"gn"`, ...) built by
`normlab.norms.create_norm`. `None` (or `"none"`) means no normalization (`nn.Identity`), for
normalizer-free networks.
`zero_init_residual=True` sets $\\gamma = 0$ in each block's last norm so every residual branch
starts at zero and each block is the identity at initialization (Goyal et al. 2017
{cite}`goyal2017accurate`; the GN paper uses it for both BN and GN {cite}`wu2018group`).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from normlab.norms import create_norm

NormLayer = Callable[[int], nn.Module]


def resolve_norm_layer(norm_layer: NormLayer | str | None) -> NormLayer | None:
    """A `norm_layer(channels)` callable for a canonical norm name (`create_norm`), a callable as it is,
    or `None` (no normalization) for `None` and `"none"`."""
    if norm_layer is None or norm_layer == "none":
        return None
    if isinstance(norm_layer, str):
        create_norm(norm_layer, 4)  # validates the name now, not at the first layer
        return functools.partial(create_norm, norm_layer)
    return norm_layer


def norm_or_identity(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    """`norm_layer(channels)`, or `nn.Identity()` for a network without normalization (`norm_layer=None`)."""
    return nn.Identity() if norm_layer is None else norm_layer(channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # no bias: a following norm's beta makes it redundant (and NF variants add their own)
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option A: stride-2 subsampling and zero-padding of the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A shortcuts cannot reduce channels ({in_channels} -> {out_channels}); use shortcut='B'")
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # pad the channel dimension: F.pad's pairs run from the last dim backwards (W, H, C)
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def make_shortcut(in_channels: int, out_channels: int, stride: int, shortcut: str,
                  norm_layer: NormLayer | None) -> nn.Module:
    """Identity when shapes agree, else option A (zero-pad) or B (1x1 conv + norm)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if shortcut == "A":
        return ShortcutA(in_channels, out_channels, stride)
    if shortcut == "B":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                             norm_or_identity(norm_layer, out_channels))
    raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a norm after each, ReLU, and a shortcut {cite}`he2016deep`.

    Every block class usable by `CIFARResNet` takes `(in_channels, out_channels, stride, norm_layer,
    shortcut)` and exposes `residual(x)` (the branch alone) and `last_norm` (the norm that
    `zero_init_residual` sets to $\\gamma = 0$; `None` if it has none).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm_layer: NormLayer | None = None, shortcut: str = "A"):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm1 = norm_or_identity(norm_layer, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = norm_or_identity(norm_layer, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut, norm_layer)

    @property
    def last_norm(self) -> nn.Module | None:
        return None if isinstance(self.norm2, nn.Identity) else self.norm2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))


class CIFARResNet(nn.Module):
    """ResNet-$(6n+2)$ for 32x32 inputs {cite}`he2016deep` with a pluggable `norm_layer`.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110; 8 and 14 give the cheap n=1, 2 variants).
        num_classes: classifier outputs.
        norm_layer: a canonical norm name (`create_norm`), a callable `norm_layer(channels) ->
            nn.Module`, or `None` for no normalization. Default `"bn"`: normlab's BatchNorm2d.
        width: channels of the first stage (16 in the paper); stages use width, 2*width, 4*width.
        shortcut: "A" (zero-pad, the paper's CIFAR choice) or "B" (1x1 conv + norm projection).
        zero_init_residual: gamma = 0 in each block's last norm, so every block starts as the identity.
        block: the residual block class (see `BasicBlock` for the interface).
        in_channels: image channels (3 for CIFAR-10, 1 for Fashion-MNIST).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, norm_layer: NormLayer | str | None = "bn",
                 width: int = 16, shortcut: Literal["A", "B"] = "A", zero_init_residual: bool = False,
                 block: type[nn.Module] = BasicBlock, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be positive integers")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        norm_layer = resolve_norm_layer(norm_layer)
        n = (depth - 2) // 6
        self.depth, self.width = depth, width
        self.conv1 = conv3x3(in_channels, width)
        self.norm1 = norm_or_identity(norm_layer, width)
        layers: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(block(channels, out_channels, stride, norm_layer, shortcut))
                channels = out_channels
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """He (Kaiming) normal init for convolutions {cite}`he2015delving`; gamma=0 on last norms if asked."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for b in self.blocks:
                norm = getattr(b, "last_norm", None)
                if norm is None or getattr(norm, "weight", None) is None:
                    raise ValueError("zero_init_residual needs a last norm with an affine weight in every block")
                nn.init.zeros_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(**kwargs) -> CIFARResNet:
    """ResNet-20 (n=3, 0.27M parameters with option-A shortcuts)."""
    return CIFARResNet(depth=20, **kwargs)


def resnet32(**kwargs) -> CIFARResNet:
    return CIFARResNet(depth=32, **kwargs)


def resnet56(**kwargs) -> CIFARResNet:
    return CIFARResNet(depth=56, **kwargs)
