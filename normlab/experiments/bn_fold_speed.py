"""BatchNorm folding at inference: speed of folded vs unfolded vs torch.fx's fuser (CPU), and precision.

Each run times one model at one batch size under `torch.inference_mode()`: the unfolded eval-mode model,
`normlab.fold.fold_batchnorm(model)` and `torch.fx.experimental.optimization.fuse(model)`, interleaved by
`normlab.bench.compare` (every repeat times each variant once, in a rotating order; medians and
quartiles), so slow drift of a shared machine hits all three alike and the *ratios* are what to read.
BatchNorm statistics and affine parameters are random (not the 0/1 defaults, which would hide a wrong
fold), and each run also records how far the folded outputs are from the unfolded ones.

`precision_study` is the cheap companion the chapter runs live: folded vs unfolded outputs in float32,
float16 and bfloat16, folding in float32 then casting vs casting then folding.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from ..bench import compare
from ..fold import count_batchnorms, fold_batchnorm, is_batchnorm
from ..utils import seed_all

_COMMON = {"models": ["resnet18", "resnet20"], "batches": [1, 32], "seed": 0, "warmup": 3}

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: tiny images, batch 1, three repeats; proves the code path, numbers are not results
    "smoke": {**_COMMON, "batches": [1], "image_size": {"resnet18": 32, "resnet20": 32},
              "repeats": 3, "warmup": 1, "min_time_s": 0.0, "threads": 1},
    # the recorded CPU benchmark: ImageNet-size ResNet-18 and CIFAR ResNet-20, one thread, 31 repeats.
    # One thread, not two: on a shared, oversubscribed 2-core machine two OpenMP threads wait for each
    # other at every barrier, and a first try with 2 threads gave quartiles wider than the median.
    "cpu": {**_COMMON, "image_size": {"resnet18": 224, "resnet20": 32}, "repeats": 31, "warmup": 2,
            "min_time_s": 0.05, "threads": 1},
    # a quieter, longer version for a dedicated machine (the timings are still CPU timings on CPU)
    "full": {**_COMMON, "image_size": {"resnet18": 224, "resnet20": 32}, "repeats": 51,
             "min_time_s": 0.1, "threads": None},
}

VARIANTS = ("unfolded", "fold", "fx_fuse")


def build_model(name: str) -> nn.Module:
    """`resnet18` (torchvision, ImageNet-size) or `resnet20` (the book's CIFAR ResNet), with torch's
    `nn.BatchNorm2d` in both so that torch.fx's fuser can fold them too (a fair comparison)."""
    if name == "resnet18":
        import torchvision
        return torchvision.models.resnet18(weights=None)
    if name == "resnet20":
        from ..models.resnet import resnet20
        return resnet20(norm_layer=nn.BatchNorm2d)
    raise ValueError(f"unknown model {name!r}: use 'resnet18' or 'resnet20'")


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random running statistics (μ ∈ [−1, 1], σ² ∈ [0.25, 1.75]) and affine parameters
    (γ ∈ [0.5, 1.5], β ∈ [−0.5, 0.5]) for every BatchNorm: the defaults would make a wrong fold look right."""
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=generator) * 2 - 1)
                    m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=generator) - 0.5)
    return model


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref|, in float64."""
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m, "batch": b, "image_size": config["image_size"][m], "seed": config["seed"]}
            for m in config["models"] for b in config["batches"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False) -> dict:
    old_threads = torch.get_num_threads()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    try:
        return _run(run, config, torch.device(device))
    finally:
        torch.set_num_threads(old_threads)


def _run(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict:
    from torch.fx.experimental.optimization import fuse

    g = seed_all(run["seed"])
    model = randomize_batchnorm(build_model(run["model"]), g).eval().to(device)
    x = torch.randn(run["batch"], 3, run["image_size"], run["image_size"], generator=g).to(device)
    variants = {"unfolded": model, "fold": fold_batchnorm(model), "fx_fuse": fuse(model)}
    with torch.inference_mode():
        ref = model(x)
        errors = {name: max_rel_err(m(x), ref) for name, m in variants.items() if name != "unfolded"}
        # enough calls per timing that one timing lasts >= min_time_s (batch-1 ResNet-20 takes ~1 ms)
        t0 = time.perf_counter()
        model(x)
        single = time.perf_counter() - t0
        inner = max(1, math.ceil(config["min_time_s"] / max(single, 1e-6)))
        stats = compare({name: (lambda m=m: m(x)) for name, m in variants.items()},
                        repeats=config["repeats"], warmup=config["warmup"], inner=inner, device=device)
        bn_share = batchnorm_time_share(model, x, config.get("profile_passes", 2))
    metrics: dict[str, Any] = {"threads": torch.get_num_threads(), "inner": inner, "bn_time_share": bn_share,
                               "loadavg_1min": _loadavg(),  # how busy the machine was (noise)
                               "bn_before": count_batchnorms(model),
                               "bn_after_fold": count_batchnorms(variants["fold"]),
                               "bn_after_fx_fuse": count_batchnorms(variants["fx_fuse"])}
    for name in VARIANTS:
        for q in ("median", "q25", "q75", "min"):
            metrics[f"{name}_{q}_ms"] = stats[name][q] * 1e3
    med = {name: stats[name]["median"] for name in VARIANTS}
    metrics["fold_over_unfolded"] = med["fold"] / med["unfolded"]  # < 1: folding is faster
    metrics["fold_over_fx_fuse"] = med["fold"] / med["fx_fuse"]
    metrics["fx_fuse_over_unfolded"] = med["fx_fuse"] / med["unfolded"]
    # the fastest repeat is the least disturbed one: a second, contention-robust estimate of the ratios
    metrics["fold_over_unfolded_min"] = stats["fold"]["min"] / stats["unfolded"]["min"]
    metrics["fold_over_fx_fuse_min"] = stats["fold"]["min"] / stats["fx_fuse"]["min"]
    metrics["max_rel_err_fold"] = errors["fold"]
    metrics["max_rel_err_fx_fuse"] = errors["fx_fuse"]
    return {"metrics": metrics, "history": []}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ backend logs its start/stop there, which would
    end up in notebooks as stderr output."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_BN_OPS = ("aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit_no_training")


def batchnorm_time_share(model: nn.Module, x: torch.Tensor, passes: int = 2) -> float:
    """Fraction of the unfolded model's operator time (torch.profiler, CPU) spent in BatchNorm ops.

    This is what folding can save at most; as a fraction within the same passes it is much less
    sensitive to other processes than a difference of two timings.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    # the outermost BN op's total time includes its children (native_batch_norm ...): take the largest
    bn = max((e.cpu_time_total for e in events if e.key in _BN_OPS), default=0.0)
    return bn / total if total else float("nan")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


# ---------------------------------------------------------------------------------------------------------
# Precision after folding (cheap; the chapter runs it live)
# ---------------------------------------------------------------------------------------------------------

def calibrated_resnet20(seed: int = 0, batches: int = 4, batch: int = 32) -> nn.Module:
    """ResNet-20 (torch BN) whose running statistics are the exact statistics of its own activations on
    random images (cumulative average, `momentum=None`) and whose γ, β are random: activations keep the
    scale a trained network has, so float16/bfloat16 errors are representative."""
    g = seed_all(seed)
    model = build_model("resnet20")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        model.train()
        for _ in range(batches):
            model(torch.randn(batch, 3, 32, 32, generator=g))
    return model.eval()


def precision_study(dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"), batch: int = 8,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Relative output error vs the unfolded float64 model, for each dtype and way of folding.

    - `unfolded`: the BN model run in `dtype`;
    - `fold fp32, cast`: folded in float32 (float64 arithmetic), then cast to `dtype`;
    - `cast, fold (fp64 math)`: cast to `dtype` first (weights and statistics rounded), then folded;
    - `cast, fold (dtype math)`: cast first and fold with the arithmetic in `dtype` itself.
    """
    model = calibrated_resnet20(seed)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        import copy
        ref = copy.deepcopy(model).double()(x.double())
        folded32 = fold_batchnorm(model)
        rows = []
        for name in dtypes:
            dt = getattr(torch, name)
            cast = copy.deepcopy(model).to(dt)
            variants = {
                "unfolded": cast,
                "fold fp32, cast": copy.deepcopy(folded32).to(dt),
                "cast, fold (fp64 math)": fold_batchnorm(cast),
                "cast, fold (dtype math)": fold_batchnorm(cast, compute_dtype=None),
            }
            for variant, m in variants.items():
                rows.append({"dtype": name, "variant": variant, "rel_err": max_rel_err(m(x.to(dt)), ref)})
    return rows
