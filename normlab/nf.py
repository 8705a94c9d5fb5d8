"""Normalizer-free ResNets: scaled weight standardization, alpha/beta residual scaling, AGC.

Brock, De & Smith, *Characterizing signal propagation to close the performance gap in unnormalized
ResNets*, ICLR 2021 {cite}`brock2021characterizing` (NF-ResNets), and Brock, De, Smith & Simonyan,
*High-Performance Large-Scale Image Recognition Without Normalization*, ICML 2021
{cite}`brock2021high` (NFNets, adaptive gradient clipping).

Batch normalization does two things for a deep ResNet at initialization: it downscales each residual
branch relative to the skip path (a branch adds $O(1)$ variance to a stream whose variance therefore
grows only linearly with depth) and it removes the mean shift that ReLU networks build up. NF-ResNets do both by construction:

$$ x_{l+1} = x_l + \\alpha\\, f_l(x_l / \\beta_l), \\qquad
   \\beta_l = \\sqrt{\\mathrm{Var}(x_l)} \\text{ (tracked analytically)}, \\quad
   \\mathrm{Var}(x_{l+1}) = \\mathrm{Var}(x_l) + \\alpha^2, $$

with every convolution using scaled weight standardization (`ScaledStdConv2d`), so each branch
$f_l$ preserves variance and has no mean shift. At a transition block the shortcut is a convolution
of the normalized input $x_l / \\beta_l$, so the expected variance restarts at $1 + \\alpha^2$.
Training without normalization at large batch or learning rate then needs adaptive gradient clipping
(`adaptive_grad_clip_`).

Also here: `PreActResNet`, the pre-activation CIFAR ResNet (ResNet-V2) {cite}`he2016identity` with
or without BatchNorm (the paper's signal propagation plots are of such networks),
`signal_propagation` to measure those plots, and `plot_signal_propagation` to draw them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models.resnet import CIFARResNet, conv3x3, make_shortcut, norm_or_identity, resolve_norm_layer
from .norms import RELU_GAMMA, ScaledStdConv2d, nonlinearity_gamma, standardize_weight

__all__ = [
    "RELU_GAMMA", "ScaledStdConv2d", "standardize_weight", "nonlinearity_gamma", "NFBlock", "NFResNet",
    "nf_resnet20", "PreActBlock", "PreActResNet", "unitwise_norm", "adaptive_grad_clip_", "agc_parameters",
    "signal_propagation", "plot_signal_propagation",
]


class NFBlock(nn.Module):
    """The normalizer-free pre-activation basic block {cite}`brock2021characterizing`.

    $$ h = \\gamma\\,\\mathrm{ReLU}(x) / \\beta, \\qquad
       y = \\mathrm{shortcut}(x, h) + \\alpha \\cdot W_2 * \\gamma\\,\\mathrm{ReLU}(W_1 * h), $$

    where both $W$ are scaled-WS convolutions (the ReLU gain $\\gamma$ is folded into their weights,
    as in timm) and the shortcut is $x$ itself, or a 1x1 scaled-WS convolution of $h$ when the shape
    changes (a transition block: its output variance is then $1 + \\alpha^2$ whatever $x$'s was).
    With `ws=False` the convolutions are plain He-initialized ones (the paper's ablation without scaled
    WS, which suffers from mean shift).

    Follows the book's block interface: `residual(x)` is the branch before the $\\alpha$ scaling.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, alpha: float = 0.2,
                 beta: float = 1.0, ws: bool = True, gamma: float = RELU_GAMMA):
        super().__init__()
        if alpha < 0 or beta <= 0:
            raise ValueError(f"alpha must be >= 0 and beta > 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.ws = float(alpha), float(beta), ws
        # With scaled WS the ReLU gain lives in the weights; without it the He init accounts for ReLU.
        self.gamma = float(gamma) if ws else 1.0
        self.conv1 = self._conv(in_channels, out_channels, 3, stride)
        self.conv2 = self._conv(out_channels, out_channels, 3, 1)
        self.projection = stride != 1 or in_channels != out_channels
        self.shortcut = self._conv(in_channels, out_channels, 1, stride) if self.projection else None

    def _conv(self, cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
        if self.ws:
            conv = ScaledStdConv2d(cin, cout, k, stride=stride, padding=k // 2, gamma=self.gamma)
        else:
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(conv.bias)  # the reference initializes biases at zero
        return conv

    @property
    def last_norm(self) -> None:  # the book's block interface: no norm to zero-init
        return None

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) * (1.0 / self.beta)  # gamma is in the next conv's weights

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(self._pre(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pre(x)
        shortcut = self.shortcut(h) if self.shortcut is not None else x
        return shortcut + self.alpha * self.conv2(F.relu(self.conv1(h)))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}, ws={self.ws}"


class NFResNet(nn.Module):
    """The normalizer-free variant of the book's CIFAR ResNet-(6n+2) {cite}`brock2021characterizing`.

    Same layout as `normlab.models.resnet.CIFARResNet` (3x3 stem, three stages of n blocks with
    `width`, 2`width`, 4`width` channels, average pooling, linear classifier), with `NFBlock`s and
    no normalization anywhere. The expected variance of the residual stream is tracked analytically,
    as in the reference code:

    $$ \\beta_l = \\sqrt{\\mathrm{Var}(x_l)}, \\qquad
       \\mathrm{Var}(x_{l+1}) = \\begin{cases} 1 + \\alpha^2 & \\text{transition block} \\\\
       \\mathrm{Var}(x_l) + \\alpha^2 & \\text{otherwise,} \\end{cases} \\qquad \\mathrm{Var}(x_0) = 1, $$

    so $\\beta_l = \\sqrt{1 + k\\alpha^2}$ for the $k$-th block after a reset. `expected_var[l]` holds
    $\\mathrm{Var}(x_l)$ for every block input. Head: $\\gamma\\,\\mathrm{ReLU}$, pooling, and a linear
    layer initialized $N(0, 0.01^2)$ as in the reference code (that layer is the one AGC leaves alone).

    Args:
        depth: 6n+2. num_classes, width, in_channels: as for `CIFARResNet`.
        alpha: the residual branch scale (0.2 in the papers).
        ws: scaled weight standardization in every convolution (False: plain He-init convolutions).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 alpha: float = 0.2, ws: bool = True):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be positive integers")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        n = (depth - 2) // 6
        self.depth, self.width, self.alpha, self.ws = depth, width, float(alpha), ws
        # The stem sees standardized pixels, not ReLU outputs: no gain to fold in.
        if ws:
            self.conv1 = ScaledStdConv2d(in_channels, width, 3, padding=1, gamma=1.0)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.conv1.bias)
        blocks: list[nn.Module] = []
        self.expected_var: list[float] = []
        var, channels = 1.0, width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                block = NFBlock(channels, out_channels, stride, alpha=alpha, beta=math.sqrt(var), ws=ws)
                blocks.append(block)
                self.expected_var.append(var)
                # A projection shortcut carries h = ReLU(x)/beta (unit variance): the variance restarts.
                var = (1.0 if block.projection else var) + alpha**2
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.gamma = RELU_GAMMA if ws else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = F.relu(x) * self.gamma
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def nf_resnet20(**kwargs) -> NFResNet:
    """NF-ResNet-20: the NF variant of the book's ResNet-20."""
    return NFResNet(depth=20, **kwargs)


class PreActBlock(nn.Module):
    """The pre-activation (ResNet-V2) basic block of He et al. {cite}`he2016identity`.

    $$ y = \\mathrm{shortcut}(x) + W_2 * \\mathrm{ReLU}(\\mathrm{norm}_2(W_1 * \\mathrm{ReLU}(\\mathrm{norm}_1(x)))). $$

    Same constructor and `residual` interface as the book's `BasicBlock`, so it also plugs into
    `CIFARResNet(block=PreActBlock)`; `PreActResNet` is the full ResNet-V2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm_layer: Callable[[int], nn.Module] | None = None, shortcut: str = "A"):
        super().__init__()
        self.norm1 = norm_or_identity(norm_layer, in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm2 = norm_or_identity(norm_layer, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut, norm_layer)

    @property
    def last_norm(self) -> nn.Module | None:
        return None if isinstance(self.norm2, nn.Identity) else self.norm2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class PreActResNet(CIFARResNet):
    """The pre-activation CIFAR ResNet (ResNet-V2) {cite}`he2016identity`: the networks of the paper's
    signal propagation plots {cite}`brock2021characterizing`.

    The book's `CIFARResNet` layout with `PreActBlock`s and projection shortcuts (1x1 conv + norm,
    option B), a bare convolution as the stem (no norm, no ReLU: the residual stream starts as the
    stem's output) and the final norm + ReLU before pooling. `norm_layer=None`: no normalization.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, norm_layer="bn", width: int = 16,
                 in_channels: int = 3):
        super().__init__(depth=depth, num_classes=num_classes, norm_layer=norm_layer, width=width,
                         shortcut="B", block=PreActBlock, in_channels=in_channels)
        norm_layer = resolve_norm_layer(norm_layer)
        self.norm1 = nn.Identity()  # the stem has no norm in ResNet-V2 ...
        self.final_norm = norm_or_identity(norm_layer, 4 * width)  # ... the last block's output gets one instead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = F.relu(self.final_norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------------------------
# Adaptive gradient clipping


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each *unit* of a parameter or gradient {cite}`brock2021high`.

    A unit is an output row: for conv (O, I, kh, kw) and linear (O, I) weights the norm runs over all
    dims but 0 (shape (O, 1, ...), broadcastable). Like the reference code, a tensor that is a scalar
    or a vector once singleton dims are squeezed (a bias, a gain) is a single unit (a 0-d norm).
    """
    if x.squeeze().ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(parameters: torch.Tensor | Iterable[torch.Tensor], clip: float = 0.01,
                        eps: float = 1e-3) -> float:
    """Adaptive gradient clipping (AGC), in place {cite}`brock2021high`, Section 4.1.

    For every unit $i$ (output row) of every parameter $W$ with gradient $G$:

    $$ G_i \\leftarrow \\begin{cases} \\lambda \\dfrac{\\max(\\|W_i\\|, \\epsilon)}{\\|G_i\\|} G_i &
       \\text{if } \\dfrac{\\|G_i\\|}{\\max(\\|W_i\\|, \\epsilon)} > \\lambda \\\\ G_i & \\text{otherwise,}
       \\end{cases} $$

    so no step of plain SGD changes a unit by more than about $\\lambda \\cdot$ lr of its norm. $\\epsilon$
    keeps zero-initialized parameters from being frozen. The paper uses $\\lambda = 0.01$ at batch 4096
    (larger for smaller batches) and does not clip the final linear layer: pass
    `agc_parameters(model)`.

    Returns the fraction of units that were clipped (a number to log).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    if not clip > 0:
        raise ValueError(f"clip (lambda) must be > 0, got {clip}; AGC with lambda=0 would zero every gradient")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps} (the reference uses 1e-3)")
    clipped = units = 0
    counts = []
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p).clamp_min(eps).mul_(clip)
        grad_norm = unitwise_norm(p.grad)
        trigger = grad_norm > max_norm
        # The clamp only prevents 0/0; it cannot engage when trigger is true since max_norm >= clip*eps.
        scale = torch.where(trigger, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        p.grad.mul_(scale)
        counts.append(trigger.sum())
        units += trigger.numel()
    if units:
        clipped = float(torch.stack(counts).sum()) / units
    return clipped


def agc_parameters(model: nn.Module, exclude: Sequence[str] = ("fc",)) -> list[torch.Tensor]:
    """The parameters AGC should clip: all but those of the modules named in `exclude` (the classifier).

    The NFNets paper found clipping the final linear layer harmful {cite}`brock2021high`.
    """
    names = dict(model.named_modules())
    missing = [e for e in exclude if e not in names]
    if missing:
        raise ValueError(f"{type(model).__name__} has no submodule(s) {missing}; "
                         f"pass exclude= with names from model.named_modules() (e.g. 'fc')")
    return [p for n, p in model.named_parameters() if not any(n == e or n.startswith(e + ".") for e in exclude)]


def agc_hook(parameters: Sequence[torch.Tensor], clip: float = 0.01, eps: float = 1e-3):
    """AGC as a trainer hook (`Trainer(hooks=[agc_hook(agc_parameters(model))])`).

    Clips `parameters`' gradients after every backward pass and logs the fraction of units clipped,
    averaged over each history row, as `agc_clip_fraction`.
    """
    params = list(parameters)

    def hook(trainer) -> None:
        trainer.log_mean("agc_clip_fraction", adaptive_grad_clip_(params, clip=clip, eps=eps))
    return hook


# ----------------------------------------------------------------------------------------------------
# Signal propagation plots


@torch.no_grad()
def signal_propagation(model: nn.Module, x: torch.Tensor) -> dict[str, list[float]]:
    """Signal propagation statistics of a ResNet at the output of each block {cite}`brock2021characterizing`.

    Runs `model(x)` (in the model's current mode: training mode uses batch statistics, as at the start
    of training) and, for every block in `model.blocks` (output $x_{l+1}$, shape N, C, H, W), records

    - `avg_sq_mean`: the average over channels of the squared channel mean $\\overline{\\mu_c^2}$ (mean
      shift),
    - `avg_var`: the average over channels of the channel variance $\\overline{\\sigma_c^2}$,
    - `res_var`: the average channel variance of the block's residual branch `block.residual(x_l)`
      (for NF blocks before the $\\alpha$ scaling),

    with means and variances over (N, H, W), as in the reference code's `signal_metrics`.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "residual") for b in blocks):
        raise ValueError("signal_propagation needs a model with `.blocks`, each block with a `residual(x)` method "
                         "(CIFARResNet, NFResNet)")
    if x.ndim != 4:
        raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    stats: dict[str, list[float]] = {"avg_sq_mean": [], "avg_var": [], "res_var": []}

    def channel_stats(t: torch.Tensor) -> tuple[float, float]:
        t = t.double()
        mean = t.mean(dim=(0, 2, 3))
        var = (t - mean[:, None, None]).pow(2).mean(dim=(0, 2, 3))  # two-pass, biased
        return float(mean.pow(2).mean()), float(var.mean())

    def hook(block: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        sq_mean, var = channel_stats(output)
        stats["avg_sq_mean"].append(sq_mean)
        stats["avg_var"].append(var)
        stats["res_var"].append(channel_stats(block.residual(inputs[0]))[1])

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


def plot_signal_propagation(spps: dict[str, dict[str, list[float]]], axes=None, colors: dict[str, str] | None = None,
                            log: bool = True):
    """Draw signal propagation plots: one line per model in each of the three panels of the paper's Fig. 1.

    `spps` maps a label to `signal_propagation`'s output; `colors` maps a label to a colour (default:
    `normlab.plots.color(label)`); `log`: logarithmic y axes. Without `axes`, makes a figure with the
    legend below the panels. Returns the axes.
    """
    import matplotlib.pyplot as plt

    from .plots import color

    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6), layout="constrained")
    titles = {"avg_sq_mean": "avg. channel squared mean", "avg_var": "avg. channel variance",
              "res_var": "residual branch variance"}
    for label, spp in spps.items():
        c = (colors or {}).get(label) or color(label.split(" ")[0])
        for ax, key in zip(axes, titles):
            ax.plot(range(1, len(spp[key]) + 1), spp[key], label=label, color=c)
    for ax, title in zip(axes, titles.values()):
        ax.set_yscale("log" if log else "linear")
        if not log:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("block")
    if fig is not None:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=min(4, len(spps)))
    return axes
