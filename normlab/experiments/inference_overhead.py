"""Whole-model inference cost of each norm, relative to the same network without norms (claims C21, C38).

C21: "inference overhead relative to no norm: BN +2%, LayerNorm +3-5%, RMSNorm +2-3%, GroupNorm +5-8%,
InstanceNorm +3-5%"; C38: compute cost "medium" for BN, LN and GN, "low" for RMSNorm and IN. Both are
about a *model's* inference time, so this times whole forward passes (eval mode, `torch.inference_mode()`,
float32, a fixed thread count), not a layer alone:

- `resnet`: the CIFAR ResNet-20 (`normlab.models.resnet`) at 32 px with `none` (identity), `bn`,
  `bn_fold` (BN folded into the convolutions with `normlab.fold.fold_weights`, `fold_resnet`: what BN
  costs when deployed as it should be), `gn` (`gn_groups` groups), `ln` (GroupNorm with one group: the
  LayerNorm of conv nets, statistics over C, H, W) and `in` (InstanceNorm with affine γ, β), at batch
  1 and 64. GN has 8 groups: Wu & He's 32 do not divide the first stage's 16 channels;
- `gpt`: the GPT-style pre-LN Transformer (`normlab.models.transformer`) with LayerNorm, RMSNorm or
  `none`, a forward pass over a full context.

Every norm exists as `torch/...` (torch.nn's layers: `nn.BatchNorm2d`, `nn.GroupNorm`,
`nn.InstanceNorm2d`, `nn.LayerNorm`, `nn.RMSNorm`) and, if `impls` asks, `normlab/...` (the book's
from-scratch layers, compositions of plain tensor ops). **The headline is `torch`**: the claims are
about what practitioners run. torch's BN, GN, IN and LN are one fused kernel each, normlab's layers
several ops each, whose cost says more about eager-mode dispatch than about the normalization. (On a
CPU, torch 2.14's `nn.RMSNorm` is itself a composite: `aten::_fused_rms_norm` runs pow, mean, add,
rsqrt and two muls, as `torch.profiler` shows; that is what practitioners get there.)

All variants of one (model, batch) are timed in one `normlab.bench.compare` (every repeat times each
variant once, in rotating order), so drift hits them alike; `inner` calls per timing make one timing
last at least `min_time_s`. Per variant the record keeps the raw per-repeat seconds per call
(`times_s`), the median and quartiles, and `ratio_vs_none` with its 95% paired-bootstrap interval
(`normlab.stats.ratio_of_medians`). Caveats: `none` computes a different function (an untrained net
is fine for timing: the matmuls and convolutions are the same); BN's running statistics are random (as
in `bn_fold_speed`), and `bn_fold_max_rel_err` checks the folded model against the unfolded one.

Readers: `overhead(record, variant, model=, batch=, impl=)` and `overhead_table(record)`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .. import bench, norms
from ..fold import count_batchnorms, fold_weights
from ..models.resnet import CIFARResNet
from ..models.transformer import Transformer, num_params
from ..stats import Interval
from ..utils import seed_all
from . import _timing
from .bn_fold_speed import max_rel_err, randomize_batchnorm

MODELS = ("resnet", "gpt")
IMPLS = ("torch", "normlab")
#: The norms of each model (besides `none`); `bn_fold` is a deployment of `bn`, timed once (`torch/`).
VARIANTS = {"resnet": ("bn", "bn_fold", "gn", "ln", "in"), "gpt": ("ln", "rms")}
#: C21's claimed overhead over no norm, as (low, high) time ratios, for a ledger to compare with.
CLAIMED_RATIO = {"bn": (1.02, 1.02), "ln": (1.03, 1.05), "rms": (1.02, 1.03), "gn": (1.05, 1.08),
                 "in": (1.03, 1.05)}

_RESNET = {"depth": 20, "width": 16, "image_size": 32, "gn_groups": 8}
_GPT = {"vocab_size": 65, "d_model": 256, "n_heads": 4, "depth": 4, "context": 256}

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: tiny nets, 3 repeats; proves the code path, the numbers are not results
    "smoke": {"resnet": {"depth": 8, "width": 8, "image_size": 16, "gn_groups": 4, "batches": [2]},
              "gpt": {"vocab_size": 11, "d_model": 16, "n_heads": 2, "depth": 2, "context": 8, "batches": [2]},
              "impls": list(IMPLS), "threads": 1, "repeats": 3, "warmup": 1, "min_time_s": 0.0, "seeds": [0]},
    # ResNet-20 at 32 px, batch 1 and 64; the char-level GPT (d=256, 4 layers) over a 256-token context,
    # batch 1 and 8. Both cores, for a quiet window: about 2-3 min (~60k model calls of 2-300 ms).
    "cpu": {"resnet": {**_RESNET, "batches": [1, 64]}, "gpt": {**_GPT, "batches": [1, 8]},
            "impls": list(IMPLS), "threads": 2, "repeats": 31, "warmup": 2, "min_time_s": 0.05, "seeds": [0]},
    "full": {"resnet": {**_RESNET, "batches": [1, 64, 256]}, "gpt": {**_GPT, "batches": [1, 8, 32]},
             "impls": list(IMPLS), "threads": None, "repeats": 51, "warmup": 5, "min_time_s": 0.1, "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (model, batch, seed): all variants of it are timed together, interleaved."""
    return [{"model": m, "batch": b, "seed": s}
            for m in MODELS if m in config for b in config[m]["batches"] for s in config["seeds"]]


def resnet_norm_layer(variant: str, impl: str, gn_groups: int) -> Callable[[int], nn.Module] | None:
    """`norm_layer(C)` for the ResNet: `none` (None), `bn`, `gn`, `ln` (= GroupNorm(1, C)), `in` (affine)."""
    _check(variant, impl, "resnet")
    if variant == "none":
        return None
    if variant in ("bn", "bn_fold"):
        return nn.BatchNorm2d if impl == "torch" else norms.BatchNorm2d
    if variant == "in":  # per-channel affine γ, β (torch's default is affine=False)
        if impl == "torch":
            return lambda c: nn.InstanceNorm2d(c, affine=True)
        return lambda c: norms.create_norm("in", c)
    groups = gn_groups if variant == "gn" else 1  # ln: one group, statistics over (C, H, W)
    if impl == "torch":
        return lambda c: nn.GroupNorm(groups, c)
    return lambda c: norms.create_norm("gn", c, num_groups=groups)


def gpt_norm(variant: str, impl: str, d_model: int) -> nn.Module:
    """The GPT's norm layer: `none` (identity), `ln` or `rms`, from torch.nn or normlab."""
    _check(variant, impl, "gpt")
    if variant == "none":
        return nn.Identity()
    if impl == "torch":
        return nn.LayerNorm(d_model) if variant == "ln" else nn.RMSNorm(d_model, eps=1e-5)
    return norms.LayerNorm(d_model) if variant == "ln" else norms.RMSNorm(d_model, eps=1e-5)


def _check(variant: str, impl: str, model: str) -> None:
    if variant != "none" and variant not in VARIANTS[model]:
        raise ValueError(f"unknown {model} variant {variant!r}: use 'none' or one of {', '.join(VARIANTS[model])}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: use 'torch' (torch.nn's layers) or 'normlab' (from scratch)")


def build(model: str, variant: str, impl: str, cfg: dict[str, Any], seed: int) -> nn.Module:
    """The eval-mode `model` ('resnet' or 'gpt') with norm `variant` (`VARIANTS`): the same weights for every
    variant, BN's running statistics and affine parameters random (`bn_fold_speed.randomize_batchnorm`)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    g = seed_all(seed)  # the same convolution / linear weights whatever the norm
    if model == "resnet":
        layer = resnet_norm_layer(variant, impl, cfg["gn_groups"])
        net = CIFARResNet(cfg["depth"], width=cfg["width"], norm_layer=layer)
        net = randomize_batchnorm(net, g).eval()
        return fold_resnet(net) if variant == "bn_fold" else net
    _check(variant, impl, "gpt")
    net = Transformer(cfg["vocab_size"], d_model=cfg["d_model"], n_heads=cfg["n_heads"], depth=cfg["depth"],
                      context=cfg["context"], placement="pre")
    for block in net.blocks:  # swap the norms; weights of the rest are untouched
        block.norm1, block.norm2 = gpt_norm(variant, impl, cfg["d_model"]), gpt_norm(variant, impl, cfg["d_model"])
    net.final_norm = gpt_norm(variant, impl, cfg["d_model"])
    return net.eval()


def fold_resnet(net: CIFARResNet) -> CIFARResNet:
    """An eval-mode copy of a BN ResNet (option-A shortcuts, the book's) with every BN folded into the conv
    before it and replaced by `nn.Identity`: $W' = s W$, $b' = \\beta - s\\mu$,
    $s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}$ (`normlab.fold.fold_weights`).

    The result has the `none` net's module tree plus conv biases, so `bn_fold` over `none` is the cost of
    the bias adds alone. `normlab.fold.fold_batchnorm` computes the same function but returns a
    `torch.fx.GraphModule`, whose flat generated `forward` runs a few percent faster or slower than the
    nested modules at batch 1 (Python overhead), which would be mistaken for the cost of the norm.
    """
    net = copy.deepcopy(net).eval()
    pairs = [(net, "conv1", "norm1")]
    pairs += [(block, f"conv{i}", f"norm{i}") for block in net.blocks for i in (1, 2)]
    for owner, c, n in pairs:
        conv, bn = getattr(owner, c), getattr(owner, n)
        w, b = fold_weights(conv.weight.detach(), None, bn.running_mean, bn.running_var, bn.eps,
                            bn.weight.detach(), bn.bias.detach())
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
        with torch.no_grad():
            folded.weight.copy_(w)
            folded.bias.copy_(b)
        setattr(owner, c, folded)
        setattr(owner, n, nn.Identity())
    if count_batchnorms(net):
        raise ValueError("fold_resnet folds the stem and block norms of an option-A CIFARResNet; this net has "
                         "other BatchNorms (option-B shortcuts?): use normlab.fold.fold_batchnorm")
    return net


def variant_keys(model: str, impls: list[str]) -> list[str]:
    """`none`, then `impl/variant` for each impl (`bn_fold` only as `torch/bn_fold`: the folded net has no norm)."""
    keys = ["none"]
    for impl in impls:
        keys += [f"{impl}/{v}" for v in VARIANTS[model] if impl == "torch" or v != "bn_fold"]
    return keys


def split_key(key: str) -> tuple[str, str]:
    """`(variant, impl)` of a record key: `"torch/gn"` -> `("gn", "torch")`, `"none"` -> `("none", "torch")`."""
    impl, _, variant = key.rpartition("/")
    return variant, impl or "torch"


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    with _timing.num_threads(config["threads"]) as threads:
        metrics = _time(run, config, torch.device(device))
    return {"metrics": {**metrics, "threads": threads}, "history": []}


def _time(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    model, batch, cfg = run["model"], run["batch"], config[run["model"]]
    keys = variant_keys(model, config["impls"])
    nets = {k: build(model, *split_key(k), cfg, run["seed"]).to(device) for k in keys}
    g = torch.Generator().manual_seed(run["seed"] + 1)
    if model == "resnet":
        x = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)
    else:
        x = torch.randint(0, cfg["vocab_size"], (batch, cfg["context"]), generator=g).to(device)
    extra: dict[str, Any] = {}
    with torch.inference_mode():
        if "torch/bn_fold" in nets:
            extra["bn_fold_max_rel_err"] = max_rel_err(nets["torch/bn_fold"](x), nets["torch/bn"](x))
        nets["none"](x)  # warm, then size `inner` so that one timing lasts >= min_time_s
        t0 = time.perf_counter()
        nets["none"](x)
        inner = max(1, math.ceil(config["min_time_s"] / max(time.perf_counter() - t0, 1e-6)))
        stats = bench.compare({k: (lambda m=m: m(x)) for k, m in nets.items()}, repeats=config["repeats"],
                              warmup=config["warmup"], inner=inner, device=device)
    metrics = _timing.timing_metrics(stats)
    ratios = {k: _timing.ratio(metrics["times_s"], k, "none") for k in keys if k != "none"}
    return {**metrics,
            "ratio_vs_none": {k: r.estimate for k, r in ratios.items()},
            "ratio_vs_none_ci": {k: [r.low, r.high] for k, r in ratios.items()},
            "headline_impl": "torch", "inner": inner, "loadavg_1min": _timing.loadavg(),
            "params": {k: num_params(m) for k, m in nets.items()}, **extra}


# --- readers ---------------------------------------------------------------------------------------------


def overhead(record: dict[str, Any], variant: str, *, model: str = "resnet", batch: int = 1, impl: str = "torch",
             seed: int = 0, confidence: float = 0.95) -> Interval:
    """Time of `model` with norm `variant` over the same model without norms, at `batch`, as an `Interval`.

    The ratio of medians and its paired-bootstrap interval, recomputed from the recorded per-repeat
    times (`normlab.stats.ratio_of_medians`): 1.05 means +5%. `variant` is one of `VARIANTS[model]`
    (`bn`, `bn_fold`, `gn`, `ln`, `in` for the ResNet; `ln`, `rms` for the GPT); `impl` is `torch`
    (the headline) or `normlab`. Unknown names, or a (model, batch) that was not recorded, raise a
    ValueError naming what to pass.

    Example (C21's "BN +2%" on ResNet-20 at batch 64):
        >>> iv = overhead(results.load("inference_overhead"), "bn", batch=64)  # doctest: +SKIP
        >>> verdict(iv, direction="less", threshold=1.02)  # doctest: +SKIP
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    _check(variant, impl, model)
    if variant == "none":
        raise ValueError("'none' is the reference every ratio is taken against: ask for a norm variant")
    key = f"{impl}/{variant}"
    m = _timing.find_run(record, "inference_overhead", model=model, batch=batch, seed=seed)["metrics"]
    if key not in m["times_s"]:
        raise ValueError(f"{key!r} was not timed in this record (timed: {', '.join(m['times_s'])}); "
                         "record a profile whose impls include it")
    return _timing.ratio(m["times_s"], key, "none", confidence)


def overhead_table(record: dict[str, Any], impl: str = "torch") -> dict[tuple[str, int], dict[str, Interval]]:
    """`{(model, batch): {variant: overhead(...)}}` for every recorded run (seed 0) and `impl`'s variants."""
    out: dict[tuple[str, int], dict[str, Interval]] = {}
    for run in record["runs"]:
        c = run["config"]
        if c.get("seed", 0) != 0:
            continue
        out[(c["model"], c["batch"])] = {
            v: overhead(record, v, model=c["model"], batch=c["batch"], impl=impl)
            for v in VARIANTS[c["model"]] if f"{impl}/{v}" in run["metrics"]["times_s"]}
    return out
