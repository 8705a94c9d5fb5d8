"""BatchNorm folding: at inference, a BatchNorm after a conv or linear layer becomes part of that layer.

In eval mode BatchNorm {cite}`ioffe2015batch` normalizes with its running statistics, so per channel $c$
it is a fixed affine map

$$\\mathrm{BN}(z)_c = \\gamma_c \\frac{z_c - \\mu_c}{\\sqrt{\\sigma_c^2 + \\epsilon}} + \\beta_c
  = s_c z_c + (\\beta_c - s_c \\mu_c), \\qquad s_c = \\frac{\\gamma_c}{\\sqrt{\\sigma_c^2 + \\epsilon}} .$$

When $z = W * x + b$ comes from a conv or linear layer whose output channel $c$ is BN's channel $c$, the
two affine maps compose into one layer (the "folding" of {cite}`jacob2018quantization`, Sec. 3.2):

$$W'_c = s_c W_c, \\qquad b'_c = s_c (b_c - \\mu_c) + \\beta_c .$$

`fold_weights` is that formula as a pure function; `fold_batchnorm` finds the (layer, BN) pairs on the
model's `torch.fx` graph and returns a folded copy. Decisions, documented once here:

- The input model is never modified: it is deep-copied, the copy is traced and folded, and the result
  (a `torch.fx.GraphModule`) is returned **in eval mode**. A model in training mode is accepted and
  gives the same eval-mode copy, because folding is only defined for the eval-mode computation (running
  statistics); the caller's model keeps its training flag.
- The model is traced with `torch.fx`, treating every module without submodules as a leaf.
- Only exact module types are folded (`nn.Conv1d/2d/3d`, `nn.ConvTranspose1d/2d/3d`, `nn.Linear`, and
  `nn.BatchNorm1d/2d/3d`, `nn.SyncBatchNorm`, normlab's `BatchNorm1d/2d`): a subclass may override
  `forward` (weight standardization, a parametrization), and then the formula above would be wrong.
- A pair is folded only when the layer's output has no other user, the layer is called once, and
  `forward` does not also read the layer's parameters directly (`self.conv.weight`).
- A BN with `track_running_stats=False` normalizes every batch with its own statistics even in eval
  mode: it is not a fixed affine map and is left in place with a warning. (`momentum=None`, the
  cumulative average, changes nothing here: the running statistics are used either way.)
- `nn.Linear` acts on the *last* dimension, `BatchNorm1d` on dimension 1. They coincide only for
  `(N, C)` input; on `(N, C, L)` input BN's channels are not the Linear's output features and folding
  would be wrong. So Linear+BN1d is folded only when shapes are known: pass `example_inputs`, the graph
  is run once through `torch.fx.passes.shape_prop.ShapeProp`, and the pair is folded if the Linear's
  output is 2-D. Without `example_inputs` such pairs are left in place with a warning. Conv+BN pairs
  are folded without shapes (conv output channels are dimension 1 of batched input); with
  `example_inputs` unbatched convs are also detected and skipped.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from . import norms

__all__ = [
    "FoldWarning",
    "FoldDecision",
    "fold_weights",
    "fold_bn_into_next_weights",
    "fold_batchnorm",
    "explain_folding",
    "count_batchnorms",
    "is_batchnorm",
]


class FoldWarning(UserWarning):
    """A BatchNorm that looks foldable was left in place; the message says why."""


@dataclass(frozen=True)
class FoldDecision:
    """What `fold_batchnorm` did with one BatchNorm call: folded into `layer`, or left and why."""

    bn: str
    layer: str | None
    folded: bool
    reason: str


# ---------------------------------------------------------------------------------------------
# The math: pure functions on tensors
# ---------------------------------------------------------------------------------------------

def _bn_scale_shift(running_mean, running_var, eps, gamma, beta, dtype):
    """s = γ/√(σ²+ε) and t = β − s·μ, in `dtype` (γ = 1, β = 0 for `affine=False`)."""
    mean = running_mean.to(dtype)
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    shift = -scale * mean
    if beta is not None:
        shift = shift + beta.to(dtype)
    return scale, shift


def _check_stats(running_mean, running_var, gamma, beta, channels: int, what: str) -> None:
    if running_mean is None or running_var is None:
        raise ValueError("BatchNorm has no running statistics (track_running_stats=False): "
                         "it is not an affine map at inference and cannot be folded")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("gamma", gamma), ("beta", beta)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"BatchNorm {name} has shape {tuple(t.shape)} but the layer has {channels} {what}; "
                             "fold a BatchNorm only into the layer whose channels it normalizes")


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
    compute_dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv/linear layer before it: `W' = s W`, `b' = s (b − μ) + β`.

    With $s_c = \\gamma_c / \\sqrt{\\sigma_c^2 + \\epsilon}$ per *output* channel $c$
    ({cite}`jacob2018quantization`, Sec. 3.2). Weight layouts:

    - `nn.Linear` `(out, in)` and `nn.ConvNd` `(out, in/groups, *k)`: output channels on dim 0;
    - `nn.ConvTransposeNd` `(in, out/groups, *k)` (`transposed=True`): output channel
      `g*(out/groups) + j` is column `j` of the rows of group `g`, so the scale is applied per group.

    `bias=None` counts as zero, `gamma`/`beta=None` (BN `affine=False`) as 1/0. The arithmetic runs in
    `compute_dtype` (float64 by default, so the only rounding is the final cast back to `weight.dtype`;
    `None` computes in `weight.dtype`; pass `torch.float32` on devices without float64, such as MPS).
    Returns plain tensors `(weight, bias)`.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have >= 2 dims (Linear or conv layout), got shape {tuple(weight.shape)}")
    if transposed:
        if weight.shape[0] % groups:
            raise ValueError(f"ConvTranspose weight {tuple(weight.shape)} has {weight.shape[0]} input channels, "
                             f"not divisible by groups={groups}")
        out_channels = weight.shape[1] * groups
    else:
        out_channels = weight.shape[0]
    _check_stats(running_mean, running_var, gamma, beta, out_channels, "output channels")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_channels},)")

    dtype = compute_dtype or weight.dtype
    scale, shift = _bn_scale_shift(running_mean, running_var, eps, gamma, beta, dtype)
    w = weight.to(dtype)
    k = [1] * (w.dim() - 2)
    if transposed:  # (in, out/groups, *k) -> (groups, in/groups, out/groups, *k)
        g_in, g_out = w.shape[0] // groups, w.shape[1]
        w = (w.reshape(groups, g_in, g_out, *w.shape[2:]) * scale.reshape(groups, 1, g_out, *k)).reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, 1, *k)
    b = shift if bias is None else bias.to(dtype) * scale + shift  # s (b − μ) + β = s b + t
    return w.to(weight.dtype), b.to(bias.dtype if bias is not None else weight.dtype)


def fold_bn_into_next_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    groups: int = 1,
    compute_dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BatchNorm that comes *before* a Linear/conv layer into it (per *input* channel).

    $W * (s \\odot x + t) + b = (W \\cdot s) * x + (b + \\sum_{i,k} W_{:,i,k} t_i)$ with
    $s = \\gamma/\\sqrt{\\sigma^2+\\epsilon}$, $t = \\beta - s\\mu$.

    Exact for `nn.Linear` and for convs **without zero padding**: a zero-padded conv pads the
    *normalized* input with zeros, the folded one pads the raw input, whose zeros BN would have mapped to
    $t \\neq 0$, so the borders differ. That is why `fold_batchnorm` does not fold BN into the next layer.
    Weight layout `(out, in/groups, *k)`; not for ConvTranspose.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have >= 2 dims (Linear or conv layout), got shape {tuple(weight.shape)}")
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {out_channels} output channels")
    in_channels = in_per_group * groups
    _check_stats(running_mean, running_var, gamma, beta, in_channels, "input channels")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_channels},)")

    dtype = compute_dtype or weight.dtype
    scale, shift = _bn_scale_shift(running_mean, running_var, eps, gamma, beta, dtype)
    k = [1] * (weight.dim() - 2)
    w = weight.to(dtype).reshape(groups, out_channels // groups, in_per_group, *weight.shape[2:])
    new_w = (w * scale.reshape(groups, 1, in_per_group, *k)).reshape(weight.shape)
    extra = (w * shift.reshape(groups, 1, in_per_group, *k)).flatten(2).sum(-1).reshape(out_channels)
    b = extra if bias is None else bias.to(dtype) + extra
    return new_w.to(weight.dtype), b.to(bias.dtype if bias is not None else weight.dtype)


# ---------------------------------------------------------------------------------------------
# The graph pass
# ---------------------------------------------------------------------------------------------

# layer type -> (number of spatial dims, transposed). Exact types only (see the module docstring).
_LAYERS: dict[type, tuple[int, bool]] = {
    nn.Linear: (0, False),
    nn.Conv1d: (1, False), nn.Conv2d: (2, False), nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True), nn.ConvTranspose2d: (2, True), nn.ConvTranspose3d: (3, True),
}


#: BatchNorm type -> the input ranks it accepts (torch's, and normlab's from-scratch ones).
_BN_RANKS: dict[type, tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), nn.SyncBatchNorm: (2, 3, 4, 5, 6),
    norms.BatchNorm1d: (2, 3), norms.BatchNorm2d: (4,),
}


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ValueError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


class _LayerTracer(torch.fx.Tracer):
    """torch.fx's tracer, but every module without submodules is a leaf (called, not traced into).

    Folding only looks at module calls, and a childless module contains none, so nothing is lost; what is
    gained is that layers with input checks in `forward` (normlab's norms raise `ValueError` on a bad shape,
    which fx cannot trace) still appear as one node.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or next(m.children(), None) is None


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _LayerTracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... on dynamic code
        raise ValueError(
            f"fold_batchnorm needs a model torch.fx can trace, and tracing {type(model).__name__} failed "
            f"({type(e).__name__}: {e}); fold its traceable submodules instead (e.g. model.features), "
            "or make the data-dependent control flow static"
        ) from e
    return torch.fx.GraphModule(model, graph, type(model).__name__)


def _output_rank(node: torch.fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _fold(model: nn.Module, example_inputs: Any = None,
          compute_dtype: torch.dtype | None = torch.float64) -> tuple[torch.fx.GraphModule, list[FoldDecision]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    model = copy.deepcopy(model).eval()  # never touch the caller's model; folding is an eval-mode identity
    gm = _trace(model)
    gm.eval()
    if inputs:
        from torch.fx.passes.shape_prop import ShapeProp
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    modules = dict(gm.named_modules())
    calls: dict[int, int] = {}  # id(module) -> number of call sites; a layer called twice can't be changed
    read: set[str] = set()  # modules whose parameters forward() also reads directly (`self.conv.weight`)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
        elif node.op == "get_attr" and "." in node.target:
            read.add(node.target.rsplit(".", 1)[0])

    decisions: list[FoldDecision] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in _BN_RANKS:
            continue
        bn = modules[node.target]
        prev = node.args[0] if node.args else None
        layer = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if layer is None or type(layer) not in _LAYERS:
            decisions.append(FoldDecision(node.target, None, False, "input is not the output of a conv/linear layer"))
            continue

        def leave(reason: str) -> None:
            decisions.append(FoldDecision(node.target, prev.target, False, reason))

        spatial, transposed = _LAYERS[type(layer)]
        rank = _output_rank(prev) if inputs else None
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            leave("track_running_stats=False: it normalizes with each batch's own statistics even in eval "
                  "mode, so it is not a fixed affine map")
        elif len(prev.users) > 1:
            others = ", ".join(str(u.name) for u in prev.users if u is not node)
            leave(f"the layer's output is also used by {others}, which must see the unnormalized values")
        elif calls[id(layer)] > 1:
            leave("the layer is called more than once; changing its weights would change the other calls")
        elif prev.target in read:
            leave("forward() also reads the layer's parameters directly; they must keep their values")
        elif spatial == 0 and rank is None:
            leave("Linear+BatchNorm1d is foldable only on (N, C) input, and the shapes are unknown: "
                  "pass example_inputs to fold_batchnorm")
        elif spatial == 0 and rank != 2:
            leave(f"the Linear's output has {rank} dims: Linear acts on the last dim, BatchNorm1d on dim 1, "
                  "so BN's channels are not the Linear's output features")
        elif spatial > 0 and (spatial + 2) not in _BN_RANKS[type(bn)]:
            leave(f"{type(bn).__name__} does not take the {spatial + 2}-d output of {type(layer).__name__}")
        elif spatial > 0 and rank is not None and rank != spatial + 2:
            leave(f"the {type(layer).__name__} runs on unbatched input, so BN's dim 1 is not its channels")
        else:
            w, b = fold_weights(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                bn.running_mean, bn.running_var, bn.eps,
                                None if bn.weight is None else bn.weight.detach(),
                                None if bn.bias is None else bn.bias.detach(),
                                transposed=transposed, groups=getattr(layer, "groups", 1),
                                compute_dtype=compute_dtype)
            # New Parameters (not in-place edits): a weight tied to another module keeps its old value there.
            layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
            layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            decisions.append(FoldDecision(node.target, prev.target, True, "folded"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval(), decisions


def fold_batchnorm(model: nn.Module,
                   example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
                   compute_dtype: torch.dtype | None = torch.float64) -> torch.fx.GraphModule:
    """A copy of `model`, in eval mode, with every foldable BatchNorm folded into the layer before it.

    Each eval-mode `BN(W * x + b)` with `W * x + b` from a `Conv1d/2d/3d`, `ConvTranspose1d/2d/3d`
    (any `groups`) or `Linear` whose output nothing else uses becomes one layer with
    `W' = s W`, `b' = s (b − μ) + β`, $s = \\gamma/\\sqrt{\\sigma^2 + \\epsilon}$ {cite}`jacob2018quantization`.
    The model is traced with `torch.fx` (it must be traceable). `example_inputs` (a tensor or tuple),
    if given, is run once for shapes; it is needed to fold `Linear + BatchNorm1d` (valid only on
    `(N, C)` input). The input model is never modified and keeps its training flag; a model in training
    mode gives the same eval-mode copy (the fold is defined by the running statistics). BatchNorms that
    follow a layer but cannot be folded are left in place with a `FoldWarning` saying why (see
    `explain_folding` for every decision). `compute_dtype` is the dtype of the folding arithmetic
    (float64 by default; `None` = each layer's own dtype), see `fold_weights`.
    """
    gm, decisions = _fold(model, example_inputs, compute_dtype)
    for d in decisions:
        if not d.folded and d.layer is not None:
            warnings.warn(f"BatchNorm {d.bn!r} after {d.layer!r} left in place: {d.reason}", FoldWarning,
                          stacklevel=2)
    return gm


def explain_folding(model: nn.Module,
                    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[FoldDecision]:
    """What `fold_batchnorm(model, example_inputs)` would do with each BatchNorm call, and why (no warnings)."""
    return _fold(model, example_inputs)[1]


def is_batchnorm(module: nn.Module) -> bool:
    """Whether `module` is a BatchNorm (torch's, any subclass, or normlab's)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, *_BN_RANKS))


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules (torch's or normlab's) in `model`."""
    return sum(is_batchnorm(m) for m in model.modules())
