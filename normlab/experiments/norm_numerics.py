r"""LayerNorm and RMSNorm in float16 / bfloat16: where the rounding error really comes from (claim C26).

The claim: RMSNorm "is more stable in mixed precision" and "avoids catastrophic cancellation (no
subtraction)". Cancellation lives in one formula, the one-pass variance

$$\sigma^2 = \mathbb{E}[x^2] - \mathbb{E}[x]^2,$$

which subtracts two numbers of size $\mu^2$ to get one of size $\sigma^2$: at $\mu/\sigma = 1000$ it
loses $\log_2(10^6) \approx 20$ bits, more than float16 (11) or bfloat16 (8) have. The two-pass
variance $\mathbb{E}[(x-\mu)^2]$ (torch's kernels, normlab's `mean_var`) subtracts $\mu$ from each
$x_i$ first, which is exact for $x_i$ near $\mu$ (Sterbenz), and then sums small squares: no
cancellation either. So the question is measured, not assumed.

**Inputs.** Rows of $d$ values $x = \mu + \sigma z$, $z \sim N(0, 1)$, $\sigma = 1$, for offsets
$\mu/\sigma \in \{0, 1, 10, 100, 1000, 10000\}$, rounded once to the low-precision `dtype`. The
reference is the float64 computation of the *same function* on those rounded inputs, so the errors
are those of the arithmetic, not of the input's representability (`input_noise` records the latter:
the RMS of the input's rounding error over $\sigma$; at $\mu = 10^4$ float16's spacing is 8 and
bfloat16's 64, so the input itself has lost the signal there, and any norm computes on noise).

**Implementations** of each norm (`IMPLS`), $\epsilon = 10^{-5}$, $\gamma = 1$, $\beta = 0$:

- `native`: `F.layer_norm` / `F.rms_norm` on the low-precision tensor (on CPU both compute in float32
  internally and round the output once: compare with `rounded`, and `*_native_vs_fp32`);
- `twopass_lowp`, `onepass_lowp` (LayerNorm), `lowp` (RMSNorm): every operation in the low dtype,
  "no fp32 accumulation". torch's own reductions accumulate half inputs in float32, so the means are
  taken by `lowp_mean`, a tree of pairwise averages $(a+b)/2$ in which every addition rounds to the
  low dtype (the error of a GPU-style tree reduction, $O(\log d)$ roundings). A tree of averages, not
  a running sum: a float16 *sum* of $d = 4096$ squares overflows (65504) once the RMS exceeds 4, and
  we want to see the rounding, not that overflow. The squares themselves still overflow float16 for
  $|x| > 256$: that is where one-pass LayerNorm and RMSNorm break (non-finite outputs,
  `*_nonfinite`);
- `twopass_fp32`, `onepass_fp32`, `fp32`: the same formulas with a half-precision input upcast to
  float32 (a float32 or float64 input stays as it is) and the statistics, by torch's reductions, and
  the normalization computed there, the output rounded once ("fp32 accumulation", what
  mixed-precision kernels do);
- `rounded`: the float64 reference rounded to the dtype, the floor no low-precision output can beat.

**Metrics**, for every `{norm}_{impl}`: the error of each output element in units of the reference
output's RMS (both norms output unit-RMS vectors, so this is the absolute error of an $O(1)$ value and
never divides by a near-zero output), `_max_err` and `_median_err` over all elements (None when some
outputs are non-finite, with `_nonfinite` their fraction); `_signal_err`, the max error in units of
the reference output's *centered* RMS (its standard deviation along the row: the part of the output
that carries the input's deviations $x_i - \mu$); and `_stat_err`, the largest relative error over
rows of the statistic (LayerNorm's $\sigma^2$, RMSNorm's $\mathbb{E}[x^2]$).

Reading RMSNorm's numbers: at $\mu \gg \sigma$ RMSNorm is a different function from LayerNorm, its
output is nearly the constant $\operatorname{sign}(\mu)$ (the signal is a relative $\sigma/\mu$ ripple
on it), so its small `_max_err` relative to its own reference says nothing about keeping the signal;
`_signal_err` does: rounding an output near 1 to float16 (spacing $2^{-10}$) already costs a ripple of
$10^{-3}$ half its size. LayerNorm's own weak point in low precision is not the variance but the mean:
$\mu$ is known only to $u|\mu|$ ($u$ the unit roundoff), and that error shifts every $x_i - \mu$,
an error of $u\,|\mu|/\sigma$ in the output (`ln_twopass_lowp`), which fp32 statistics remove.

One more behaviour the records show: torch's CPU `layer_norm` kernel for float16/bfloat16 input returns
a non-zero constant for a constant row at a large offset (about 0.08 in float16 at $10^4$, where the
float32 kernel returns 0), as if it computed $x\cdot r - \mu\cdot r$ in float32 with $r =
1/\sqrt{\epsilon}$; it shows up at $\mu = 10^4$, where the rounded input rows are (nearly) constant.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..utils import seed_all

EPS = 1e-5
NORMS = ("ln", "rms")
IMPLS = {"ln": ("native", "twopass_lowp", "onepass_lowp", "twopass_fp32", "onepass_fp32", "rounded"),
         "rms": ("native", "lowp", "fp32", "rounded")}
DTYPES = ("float16", "bfloat16", "float32", "float64")

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"hidden": 256, "rows": 2, "offsets": [0, 1000], "dtypes": ["float16", "float64"], "seeds": [0]},
    # seconds on one core
    "cpu": {"hidden": 4096, "rows": 8, "offsets": [0, 1, 10, 100, 1000, 10000],
            "dtypes": ["float16", "bfloat16", "float32"], "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"dtype": dt, "offset": o, "seed": s} for dt in config["dtypes"] for o in config["offsets"]
            for s in config["seeds"]]


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def lowp_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim by a tree of pairwise averages, each rounded to `x.dtype` (keepdim).

    $m^{(k+1)}_j = (m^{(k)}_{2j} + m^{(k)}_{2j+1}) / 2$ until one value is left; the halving is exact
    (barring subnormals), so every rounding is that of an addition in `x.dtype`.
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"lowp_mean needs a power-of-two last dim (a balanced tree), got {d}; "
                         f"use hidden = 256, 1024, 4096, ...")
    while x.shape[-1] > 1:
        x = (x[..., 0::2] + x[..., 1::2]) * 0.5  # two ops, two roundings in x.dtype (the * 0.5 is exact)
    return x


def layer_norm(x: torch.Tensor, mean: Callable[[torch.Tensor], torch.Tensor], onepass: bool):
    r"""$(x-\mu)/\sqrt{\sigma^2+\epsilon}$ in `x.dtype` with means by `mean`; returns (y, $\sigma^2$)."""
    mu = mean(x)
    if onepass:
        var = mean(x * x) - mu * mu  # E[x²] - E[x]²: cancels when |μ| ≫ σ
    else:
        c = x - mu
        var = mean(c * c)  # E[(x - μ)²]: the subtraction is exact near μ, the squares are small
    return (x - mu) * torch.rsqrt(var + EPS), var


def rms_norm(x: torch.Tensor, mean: Callable[[torch.Tensor], torch.Tensor]):
    r"""$x/\sqrt{\mathbb{E}[x^2]+\epsilon}$ in `x.dtype`; returns (y, $\mathbb{E}[x^2]$)."""
    ms = mean(x * x)
    return x * torch.rsqrt(ms + EPS), ms


def _torch_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=-1, keepdim=True)


def compute(norm: str, impl: str, xl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output (in float64) and statistic (or None) of `norm` by `impl` on the low-precision input `xl`."""
    if norm not in NORMS or impl not in IMPLS[norm]:
        raise ValueError(f"unknown (norm, impl) ({norm!r}, {impl!r}); choose from {IMPLS}")
    d = xl.shape[-1]
    if impl == "native":
        y = F.layer_norm(xl, (d,), eps=EPS) if norm == "ln" else F.rms_norm(xl, (d,), eps=EPS)
        return y.double(), None
    if impl == "rounded":
        y, s = reference(norm, xl)
        return y.to(xl.dtype).double(), None
    fp32 = impl.endswith("fp32")
    x = xl.float() if fp32 and xl.dtype in (torch.float16, torch.bfloat16) else xl  # float64 stays float64
    mean = _torch_mean if fp32 else lowp_mean  # fp32: torch's reduction (float32 accumulation, or wider)
    y, s = layer_norm(x, mean, impl.startswith("onepass")) if norm == "ln" else rms_norm(x, mean)
    return y.to(xl.dtype).double(), s.double()


def reference(norm: str, xl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 two-pass computation on the rounded input: what every implementation approximates."""
    x = xl.double()
    return layer_norm(x, _torch_mean, onepass=False) if norm == "ln" else rms_norm(x, _torch_mean)


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _inf_if_not_finite(e: torch.Tensor) -> torch.Tensor:
    """`e` with NaN (and -inf) as +inf, so a max or median over it counts a broken output as the worst."""
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


def errors(y: torch.Tensor, ref: torch.Tensor, s: torch.Tensor | None, s_ref: torch.Tensor) -> dict[str, Any]:
    """Max / median error in units of the reference's RMS, non-finite fraction, statistic's relative error."""
    scale = ref.pow(2).mean().sqrt().item() or 1.0  # 1 where the reference is all zeros (a constant input)
    signal = ref.var(dim=-1, unbiased=False).mean().sqrt().item() or 1.0  # the rows' centered RMS
    diff = _inf_if_not_finite((y - ref).abs())
    out = {"max_err": _num((diff.max() / scale).item()), "median_err": _num((diff.median() / scale).item()),
           "signal_err": _num((diff.max() / signal).item()), "nonfinite": (~torch.isfinite(y)).double().mean().item()}
    if s is not None:
        rel = _inf_if_not_finite((s - s_ref).abs() / s_ref.abs().clamp_min(EPS))
        out["stat_err"] = _num(rel.max().item())
    return out


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    dtype = _dtype(run["dtype"])
    gen = seed_all(run["seed"])
    x = run["offset"] + torch.randn(config["rows"], config["hidden"], generator=gen, dtype=torch.float64)
    xl = x.to(device=device, dtype=dtype)
    metrics: dict[str, Any] = {"input_noise": ((xl.double().cpu() - x).pow(2).mean().sqrt()).item(),
                               "device": str(torch.device(device))}
    for norm in NORMS:
        ref, s_ref = reference(norm, xl)
        outputs = {}
        for impl in IMPLS[norm]:
            y, s = compute(norm, impl, xl)
            outputs[impl] = y
            for k, v in errors(y, ref, s, s_ref).items():
                metrics[f"{norm}_{impl}_{k}"] = v
        # ~ one output ulp: the native kernel computes in float32 and rounds once, like `fp32`
        fp32 = outputs["twopass_fp32" if norm == "ln" else "fp32"]
        metrics[f"{norm}_native_vs_fp32"] = _num((outputs["native"] - fp32).abs().max().item())
    return {"metrics": metrics, "history": []}


# ---------------------------------------------------------------------------------------------------
# Readers: the numbers a ledger quotes
# ---------------------------------------------------------------------------------------------------

def error_table(record: dict[str, Any], dtype: str, stat: str = "max_err") -> dict[float, dict[str, Any]]:
    """`{offset: {"ln_twopass_lowp": value, ...}}` of `stat` (`max_err`, `median_err`, `stat_err`,
    `nonfinite`) for every implementation, at `dtype`, plus `input_noise`; offsets ascending."""
    _dtype(dtype)
    rows = [r for r in record["runs"] if r["config"]["dtype"] == dtype]
    if not rows:
        recorded = sorted({r["config"]["dtype"] for r in record["runs"]})
        raise ValueError(f"no runs at dtype {dtype!r}; recorded: {recorded}")
    table = {}
    for r in sorted(rows, key=lambda r: r["config"]["offset"]):
        m = r["metrics"]
        row = {f"{n}_{i}": m.get(f"{n}_{i}_{stat}") for n in NORMS for i in IMPLS[n]}
        table[r["config"]["offset"]] = {**row, "input_noise": m["input_noise"]}
    return table


def breakdown_offset(record: dict[str, Any], dtype: str, impl: str, tol: float = 0.01) -> float | None:
    """The smallest recorded offset at which `impl` (e.g. "ln_onepass_fp32") has a max error above
    `tol` (or non-finite outputs); None if it stays within `tol` at every offset.

    `tol` must sit above the dtype's own output rounding (`{norm}_rounded` in `error_table`: about
    1e-3 for float16, 1.5e-2 for bfloat16), else every implementation "breaks" at offset 0: use
    e.g. 0.01 for float16 and float32, 0.1 for bfloat16. Offsets whose `input_noise` is near 1 or
    more (the rounded input has lost the signal: float16 at 1e4, bfloat16 at 1e3 and up) test a
    degenerate input.
    """
    for offset, row in error_table(record, dtype).items():
        if impl not in row:
            names = ", ".join(k for k in row if k != "input_noise")
            raise ValueError(f"unknown implementation {impl!r}; the table has {names}")
        if row[impl] is None or row[impl] > tol:
            return offset
    return None
