"""Speed of LayerNorm vs RMSNorm, forward + backward, at LLM-like shapes (from scratch, native, compiled).

RMSNorm (Zhang & Sennrich, 2019) drops LayerNorm's mean subtraction and bias; its paper reports that it
"reduces the running time by 7%~64% on different models". This experiment measures the claim on the machine at hand: for each
shape `tokens x hidden` it times one forward + backward pass (input and parameter gradients) of

- `scratch`: normlab's from-scratch `LayerNorm` / `RMSNorm` (plain tensor ops, eager mode);
- `native`: `torch.nn.LayerNorm` / `torch.nn.RMSNorm` (PyTorch's own kernels);
- `compiled`: `torch.compile` of the from-scratch modules (TorchInductor; on CPU it needs a C++
  compiler — when compiling fails, the failure is recorded instead of a time).

All six candidates of one shape are timed in *one* `normlab.bench.compare` call: every repeat times
each candidate once, in rotating order, so drift and other processes on the machine hit LayerNorm and
RMSNorm alike and the ratios stay meaningful even when the absolute times are noisy. On a CPU each
shape is timed with every thread count in `threads` (`None`: leave torch's setting alone): on a busy
machine a multi-threaded OpenMP region stalls whenever one of its threads is descheduled, so the
single-thread timings are the cleaner ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import bench
from ..utils import seed_all
from ._timing import num_threads

IMPLS = ("scratch", "native", "compiled")
NORMS = ("ln", "rms")

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: one tiny shape, eager only
    "smoke": {"shapes": [[256, 64]], "impls": ["scratch", "native"], "dtype": "float32", "threads": [1],
              "repeats": 3, "warmup": 1, "inner": 1, "eps": 1e-5, "seeds": [0]},
    # the real thing on a CPU: shapes of GPT-2 small (768) to LLaMA-7B-ish (4096) hidden sizes
    "cpu": {"shapes": [[4096, 768], [4096, 2048], [2048, 4096], [8192, 1024]],
            "impls": list(IMPLS), "dtype": "float32", "threads": [2, 1],
            "repeats": 25, "warmup": 3, "inner": 1, "eps": 1e-5, "seeds": [0]},
    # a GPU: more tokens, more repeats, several calls per timing to amortize launch overhead
    "full": {"shapes": [[4096, 768], [4096, 2048], [2048, 4096], [8192, 1024], [16384, 4096], [32768, 8192]],
             "impls": list(IMPLS), "dtype": "float32", "threads": [None],
             "repeats": 51, "warmup": 10, "inner": 10, "eps": 1e-5, "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (thread count, shape, seed): all implementations of a shape are timed together, interleaved."""
    return [{"tokens": t, "hidden": h, "threads": n, "seed": s}
            for n in config.get("threads", [None]) for t, h in config["shapes"] for s in config["seeds"]]


def make_layers(impl: str, hidden: int, eps: float) -> dict[str, nn.Module]:
    """The LayerNorm and RMSNorm modules of one implementation (`scratch`, `native` or `compiled`)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    if impl == "native":
        return {"ln": nn.LayerNorm(hidden, eps=eps), "rms": nn.RMSNorm(hidden, eps=eps)}
    from .. import norms  # the from-scratch layers

    layers = {"ln": norms.LayerNorm(hidden, eps=eps), "rms": norms.RMSNorm(hidden, eps=eps)}
    if impl == "compiled":
        # static shapes: each shape gets its own specialized kernel, as in a fixed-size LLM step
        layers = {k: torch.compile(m, dynamic=False) for k, m in layers.items()}
    return layers


def reset_compiler() -> None:
    """Forget compiled graphs, so each shape gets a fresh static-shape compile (not a cached/dynamic one)."""
    torch._dynamo.reset()


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """A closure doing one training-style step of `layer`: forward, then backward to `x` and the params."""
    params = list(layer.parameters())

    def step() -> None:
        x.grad = None  # no gradient accumulation: every call does the same work
        for p in params:
            p.grad = None
        layer(x).backward(grad)

    return step


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    """Time every (implementation, norm) of one shape; metrics in milliseconds, plus RMS/LN ratios."""
    with num_threads(run.get("threads")):
        return _time_shape(run, config, torch.device(device))


def _time_shape(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    dtype = getattr(torch, config["dtype"])
    gen = seed_all(run["seed"])
    tokens, hidden = run["tokens"], run["hidden"]
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)

    if "compiled" in config["impls"]:
        reset_compiler()
    fns: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for impl in config["impls"]:
        layers = make_layers(impl, hidden, config["eps"])
        for norm, layer in layers.items():
            fn = fwd_bwd(layer.to(device=device, dtype=dtype), x, grad)
            if impl == "compiled":
                try:  # compile now, so a failure is a recorded fact and not a crash of the sweep
                    fn()
                except Exception as e:  # noqa: BLE001 - any backend error (no compiler, ...) is recorded
                    errors[f"{impl}/{norm}"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                    continue
            fns[f"{impl}/{norm}"] = fn

    stats = bench.compare(fns, repeats=config["repeats"], warmup=config["warmup"], inner=config["inner"],
                          device=device)
    timings = {name: {"median_ms": s["median"] * 1e3, "q25_ms": s["q25"] * 1e3, "q75_ms": s["q75"] * 1e3,
                      "min_ms": s["min"] * 1e3, "repeats": s["repeats"]} for name, s in stats.items()}
    metrics: dict[str, Any] = {}
    for impl in config["impls"]:
        if f"{impl}/ln" in stats and f"{impl}/rms" in stats:
            metrics[f"ratio_rms_ln_{impl}"] = bench.ratio(stats, f"{impl}/rms", f"{impl}/ln")
    for impl in config["impls"]:  # the best-of-repeats ratio: robust to interference, which only adds time
        if f"{impl}/ln" in stats and f"{impl}/rms" in stats:
            metrics[f"min_ratio_rms_ln_{impl}"] = stats[f"{impl}/rms"]["min"] / stats[f"{impl}/ln"]["min"]
    metrics["timings"] = timings
    metrics["num_threads"] = torch.get_num_threads()
    metrics["compile_errors"] = errors
    # GB moved by one fwd+bwd at minimum (read x, write y; read x, dy, write dx), for a bandwidth view
    metrics["min_bytes_moved"] = 5 * tokens * hidden * x.element_size()
    return {"metrics": metrics, "history": []}
