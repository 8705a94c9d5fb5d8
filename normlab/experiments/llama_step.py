"""Whole-model training step of a small LLaMA-style decoder with LayerNorm vs RMSNorm (claims C23, C24).

The RMSNorm paper's "reduces the running time by 7%~64%" {cite}`zhang2019root` is a whole-model
training-time figure; `norm_speed` times the layer alone. This times what the claim is about: one
training step of the book's `Trainer` (forward, backward, AdamW step) of `normlab.models.llama.Llama` (pre-norm,
SwiGLU, rotary positions, no biases, byte-level vocabulary of 256 so that the head's share of the step
stays small, as it is at LLaMA scale), for a few widths, in float32 and under bfloat16 autocast, with

- `torch/ln`, `torch/rms`: `torch.nn.LayerNorm` (with bias) and `torch.nn.RMSNorm` — the headline;
- `normlab/ln`, `normlab/rms`: the from-scratch layers, if `impls` asks;
- `none`: every norm replaced by the identity, to measure the share of the step the norms cost,
  `1 - t(none) / t(norm)` (the time removing them saves, their optimizer work included). The net
  without norms computes a different function; the matmuls it times are the same.

All variants of one (width, precision) are timed in one `normlab.bench.compare` (interleaved, same
repeats, same batch of random tokens, same initial weights; AdamW's learning rate is tiny so the
weights barely move over the repeats). Metrics: raw per-repeat seconds per step (`times_s`), medians,
`tokens_per_s`, `ratio_rms_ln` (RMS over LN time, per impl) and `norm_share` with 95% paired-bootstrap
intervals (`normlab.stats.ratio_of_medians`), parameter counts. Readers: `rms_over_ln`, `norm_share`.

Caveats, checked with `torch.profiler` on torch 2.14 (CPU): `nn.RMSNorm` is a composite there (pow,
mean, add, rsqrt, mul: no fused CPU kernel, forward or backward) while `nn.LayerNorm` is one fused
kernel each way; under bf16 autocast `nn.RMSNorm` gets a bf16 input and a float32 weight, and torch
warns that it "cannot dispatch to fused implementation" (silenced here). Position information comes
from rotary embeddings, as in LLaMA.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .. import bench
from ..models.llama import IMPLS, Llama, train_flops_per_token
from ..stats import Interval
from ..tasks import CharLM
from ..train import Trainer, TrainConfig
from ..utils import seed_all
from . import _timing

PRECISIONS = ("fp32", "bf16")
NORMS = ("ln", "rms")

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: a 2-layer d=32 model; proves the code path, the numbers are not results
    "smoke": {"d_models": [32], "head_dim": 16, "depth": 2, "context": 16, "batch": 2, "vocab_size": 64,
              "precisions": list(PRECISIONS), "impls": list(IMPLS), "none": True, "lr": 1e-5,
              "threads": 1, "repeats": 3, "warmup": 1, "seeds": [0]},
    # d = 256 and 512 (4 and 8 heads of 64), 4 layers, 4 x 256 tokens a step; both cores, for a quiet window:
    # about 3 min (5 variants x 23 steps x 0.13-0.75 s a step on one core, summed over the 4 runs)
    "cpu": {"d_models": [256, 512], "head_dim": 64, "depth": 4, "context": 256, "batch": 4, "vocab_size": 256,
            "precisions": list(PRECISIONS), "impls": list(IMPLS), "none": True, "lr": 1e-5,
            "threads": 2, "repeats": 21, "warmup": 2, "seeds": [0]},
    "full": {"d_models": [256, 512, 1024, 2048], "head_dim": 64, "depth": 8, "context": 1024, "batch": 8,
             "vocab_size": 256, "precisions": list(PRECISIONS), "impls": list(IMPLS), "none": True, "lr": 1e-5,
             "threads": None, "repeats": 31, "warmup": 5, "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (width, precision, seed): every norm of it is timed together, interleaved."""
    return [{"d_model": d, "precision": p, "seed": s}
            for d in config["d_models"] for p in config["precisions"] for s in config["seeds"]]


def variant_keys(config: dict[str, Any]) -> list[str]:
    """`impl/norm` for every impl and norm, then `none` if the config times it."""
    return [f"{impl}/{norm}" for impl in config["impls"] for norm in NORMS] + (["none"] if config["none"] else [])


def build(config: dict[str, Any], d_model: int, key: str, seed: int) -> Llama:
    """The model of a variant key (`torch/rms`, `normlab/ln`, `none`, ...), the same weights for every key."""
    impl, _, norm = key.rpartition("/")
    seed_all(seed)
    return Llama(config["vocab_size"], d_model=d_model, n_heads=d_model // config["head_dim"], depth=config["depth"],
                 context=config["context"], norm=norm, impl=impl or "torch")


def train_step(model: Llama, tokens: torch.Tensor, precision: str, lr: float, seed: int = 0) -> Callable[[], None]:
    """A closure doing one training step of `normlab.train.Trainer` (the book's one loop): a batch of
    windows of `tokens` (shape `(batch, context + 1)`: the batch size and context), the loss under
    bf16 autocast for `bf16`, backward, an AdamW step at a constant `lr`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    batch, context = tokens.shape[0], tokens.shape[1] - 1
    stream = tokens.flatten().long()
    task = CharLM(stream, stream, context, eval_windows=1)
    tc = TrainConfig(epochs=None, steps=1, batch_size=batch, optimizer="adamw", lr=lr, weight_decay=0.0,
                     schedule="constant", precision=precision, seed=seed)
    trainer = Trainer(model, task, tc, device=tokens.device)

    def step() -> None:
        trainer.step = 0  # a step budget of 1: keep the (constant) schedule in range across repeats
        trainer.train_step()

    return step


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    with _timing.num_threads(config["threads"]) as threads, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Cannot dispatch to fused implementation")
        metrics = _time(run, config, torch.device(device))
    return {"metrics": {**metrics, "threads": threads}, "history": []}


def _time(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    d, keys = run["d_model"], variant_keys(config)
    g = torch.Generator().manual_seed(run["seed"] + 1)
    tokens = torch.randint(0, config["vocab_size"], (config["batch"], config["context"] + 1), generator=g).to(device)
    models = {k: build(config, d, k, run["seed"]).to(device) for k in keys}
    steps = {k: train_step(m, tokens, run["precision"], config["lr"]) for k, m in models.items()}
    stats = bench.compare(steps, repeats=config["repeats"], warmup=config["warmup"], device=device)
    metrics = _timing.timing_metrics(stats)
    times, n_tokens = metrics["times_s"], config["batch"] * config["context"]
    ratios = {impl: _timing.ratio(times, f"{impl}/rms", f"{impl}/ln") for impl in config["impls"]}
    shares = {k: _share(_timing.ratio(times, "none", k)) for k in keys if k != "none"} if config["none"] else {}
    m = models[keys[0]]
    return {**metrics,
            "tokens_per_step": n_tokens,
            "tokens_per_s": {k: n_tokens / s["median"] for k, s in stats.items()},
            "ratio_rms_ln": {k: r.estimate for k, r in ratios.items()},
            "ratio_rms_ln_ci": {k: [r.low, r.high] for k, r in ratios.items()},
            "norm_share": {k: s.estimate for k, s in shares.items()},
            "norm_share_ci": {k: [s.low, s.high] for k, s in shares.items()},
            "params": {k: sum(p.numel() for p in mod.parameters()) for k, mod in models.items()},
            "d_ff": m.d_ff, "n_heads": m.n_heads,
            "train_mflop_per_token": train_flops_per_token(m) / 1e6,
            "loadavg_1min": _timing.loadavg()}


def _share(none_over_norm: Interval) -> Interval:
    """`1 - t(none)/t(norm)` from the ratio's interval (the bounds swap: a larger ratio, a smaller share)."""
    r = none_over_norm
    return Interval(1 - r.estimate, 1 - r.high, 1 - r.low, r.n, r.method, r.confidence)


# --- readers ---------------------------------------------------------------------------------------------


def _times(record: dict[str, Any], d_model: int, precision: str, seed: int) -> dict[str, list[float]]:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return _timing.find_run(record, "llama_step", d_model=d_model, precision=precision, seed=seed)["metrics"]["times_s"]


def _key(impl: str, norm: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: use 'torch' (torch.nn's layers, the headline) or 'normlab'")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use 'ln' or 'rms'")
    return f"{impl}/{norm}"


def rms_over_ln(record: dict[str, Any], d_model: int, precision: str = "fp32", impl: str = "torch",
                *, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Training-step time with RMSNorm over LayerNorm at width `d_model`, as an `Interval` (< 1: RMSNorm faster).

    Recomputed from the recorded per-repeat times (`normlab.stats.ratio_of_medians`, paired). The RMSNorm
    paper's 7%-64% saving is `1 - ratio` in 0.07-0.64, i.e. a ratio in [0.36, 0.93].

    Example:
        >>> iv = rms_over_ln(results.load("llama_step"), 512, "bf16")  # doctest: +SKIP
        >>> verdict(iv, direction="less", threshold=0.93)  # "at least 7% faster"  # doctest: +SKIP
    """
    times = _times(record, d_model, precision, seed)
    return _timing.ratio(times, _key(impl, "rms"), _key(impl, "ln"), confidence)


def norm_share(record: dict[str, Any], norm: str, d_model: int, precision: str = "fp32", impl: str = "torch",
               *, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Share of the training step that `norm`'s layers cost, `1 - t(none)/t(norm)`, as an `Interval`.

    Needs a record that timed `none` (`"none": true` in the profile).
    """
    times = _times(record, d_model, precision, seed)
    if "none" not in times:
        raise ValueError("this record did not time the 'none' variant: record a profile with \"none\": true")
    return _share(_timing.ratio(times, "none", _key(impl, norm), confidence))

