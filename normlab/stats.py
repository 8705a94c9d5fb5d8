"""The book's statistics: differences with intervals, ratios of medians, and one verdict vocabulary.

Every chapter that compares two cells reports the difference with an interval and turns the
interval into a verdict with the same rule, so "holds" means the same thing in chapter 3 as in
chapter 9. The pieces:

- `paired_difference(a, b)`: runs paired by seed (same seed, same data order and initialization for
  both cells). The mean of the per-seed differences $d_i = a_i - b_i$ with the Student t interval

  $$\\bar d \\pm t_{1-\\alpha/2,\\,n-1}\\, \\frac{s_d}{\\sqrt n} .$$

  Why t and not a bootstrap: a cell has 3-5 seeds, and the percentile bootstrap of 3 values can only
  produce means of those 3 values (10 distinct resample means): its interval is far too narrow and
  jumps with the seed of the resampling. The t interval assumes the differences are roughly normal,
  which is all that 3-5 values can be asked to support, and is exact under that assumption.
- `unpaired_difference(a, b)`: cells not paired by seed; Welch's t interval (unequal variances).
- `ratio_of_medians(num, den)`: benchmarks. `normlab.bench.compare` times the candidates interleaved,
  repeat $r$ timing each once, back to back; the ratio of their medians gets a percentile bootstrap
  interval that resamples *repeats* (jointly for both candidates, so drift shared by a repeat
  cancels). Timings are skewed and have outliers; the median and the bootstrap need no normality.
- `verdict(interval, ...)`: one of `MEASURED_VERDICTS`; the rule is in its docstring.
- `verdict_table(rows)`: the fixed-width lines a chapter prints.
- `median_iqr(values)`: median and quartiles, the summary `normlab.bench.summarize` reports.

The Student t quantile is computed here (`t_quantile`, by bisection on the t distribution function,
written with the regularized incomplete beta function), so numpy is the only dependency.

Vocabulary: `VERDICTS` is what chapters write ("holds", "does not hold", "within noise", and
`NOT_TESTED` for claims a chapter names but does not measure); `verdict` only ever returns the three
measured ones. `CLAIM_VERDICTS` is the superset the claims ledger uses, which adds verdicts that come
from reading sources rather than from measurements.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "HOLDS",
    "DOES_NOT_HOLD",
    "WITHIN_NOISE",
    "NOT_TESTED",
    "MEASURED_VERDICTS",
    "VERDICTS",
    "CLAIM_VERDICTS",
    "Interval",
    "Quartiles",
    "check_verdict",
    "median_iqr",
    "paired_difference",
    "ratio_of_medians",
    "t_quantile",
    "unpaired_difference",
    "verdict",
    "verdict_table",
]

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
WITHIN_NOISE = "within noise"
NOT_TESTED = "not tested here"

#: What `verdict` returns: the verdicts a measurement can give.
MEASURED_VERDICTS = (HOLDS, DOES_NOT_HOLD, WITHIN_NOISE)
#: What a chapter writes next to a claim: a measured verdict, or `NOT_TESTED` said explicitly.
VERDICTS = MEASURED_VERDICTS + (NOT_TESTED,)
#: The claims ledger's vocabulary: every chapter verdict, plus the ones that come from sources.
CLAIM_VERDICTS = VERDICTS + ("partly", "wrong per source", "no source found", "not testable here")

DIRECTIONS = ("greater", "less", "two-sided", "equivalent")


def check_verdict(word: str, vocabulary: Sequence[str] = VERDICTS) -> str:
    """`word` itself if it is in `vocabulary` (default `VERDICTS`), else a ValueError listing the words."""
    if word not in vocabulary:
        raise ValueError(f"unknown verdict {word!r}: use one of {', '.join(map(repr, vocabulary))}")
    return word


# --- intervals -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate with a confidence interval `[low, high]`.

    `n` is the number of pairs (seeds, or interleaved repeats), or `(n_a, n_b)` when the two sides
    were not paired. `method` names how the interval was made ("t", "welch", "bootstrap-paired",
    "bootstrap"); `confidence` is its nominal coverage. `sd` is the standard deviation of the paired
    differences (paired t only), `se` the standard error the t interval used, `df` its degrees of
    freedom; each is None where the method has none.
    """

    estimate: float
    low: float
    high: float
    n: int | tuple[int, int]
    method: str
    confidence: float
    sd: float | None = None
    se: float | None = None
    df: float | None = None

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, digits: int = 3) -> str:
        """`estimate [low, high]`, each rounded to `digits` decimals."""
        return f"{_fmt(self.estimate, digits)} [{_fmt(self.low, digits)}, {_fmt(self.high, digits)}]"

    def __str__(self) -> str:
        return f"{self.format()} ({self.confidence:.0%} {self.method}, n={_fmt_n(self.n)})"


def _fmt(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _fmt_n(n: int | tuple[int, int]) -> str:
    return "+".join(map(str, n)) if isinstance(n, tuple) else str(n)


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return float(confidence)


def _values(xs: Sequence[Any], what: str, labels: Sequence[Any] | None = None) -> np.ndarray:
    """`xs` as a float64 array; None, NaN or infinities are refused, naming the index (or seed)."""
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Iterable):
        raise ValueError(f"{what} must be a sequence of numbers (or a dict keyed by seed), got {type(xs).__name__}")
    xs = list(xs)
    out = np.empty(len(xs), dtype=np.float64)
    for i, x in enumerate(xs):
        where = f"seed {labels[i]!r}" if labels is not None else f"index {i}"
        try:
            v = float(x)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            raise ValueError(f"{what} at {where} is {x!r}: drop or re-run that run so every value is a finite number")
        out[i] = v
    return out


def _paired_values(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("pass both a and b as dicts keyed by seed, or both as sequences in the same seed order")
    if isinstance(a, Mapping):
        only_a = [k for k in a if k not in b]
        only_b = [k for k in b if k not in a]
        if only_a or only_b:
            raise ValueError(f"seeds are unmatched (only in a: {only_a}, only in b: {only_b}): "
                             "run the missing seeds, or drop them from both sides")
        seeds = list(a)
        return _values([a[k] for k in seeds], "a", seeds), _values([b[k] for k in seeds], "b", seeds)
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"paired values need equal lengths, got {len(xa)} and {len(xb)}: give one value per seed "
                         "on each side (or dicts keyed by seed), or use unpaired_difference for unpaired cells")
    return xa, xb


def _side(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Mapping):
        keys = list(x)
        return _values([x[k] for k in keys], what, keys)
    return _values(x, what)


def _need_seeds(n: int, what: str = "a paired difference") -> None:
    if n < 2:
        raise ValueError(f"{what} needs at least 2 values for an interval, got {n}: record at least 3 seeds")


def paired_difference(a: Any, b: Any, *, confidence: float = 0.95, method: str = "t") -> Interval:
    """Mean of the per-seed differences $d_i = a_i - b_i$, with a Student t interval.

    $$\\bar d \\pm t_{1-\\alpha/2,\\,n-1}\\, \\frac{s_d}{\\sqrt n}, \\qquad
      s_d^2 = \\frac{1}{n-1} \\sum_i (d_i - \\bar d)^2, \\qquad \\alpha = 1 - \\text{confidence}.$$

    `a` and `b` are sequences in the same seed order, or dicts keyed by seed (paired by key; seeds on
    one side only are an error that lists them). The t interval and not a bootstrap: with 3-5 seeds a
    bootstrap's percentiles are degenerate (3 values have only 10 distinct resample means). At least 2
    seeds are needed for any interval; the book's standard is at least 3 (with 2, the 95% quantile is
    12.7 and the interval is rarely informative). NaN, None and infinities are refused, naming the
    index or seed.

    Example:
        >>> iv = paired_difference({0: 91.2, 1: 90.8, 2: 91.0}, {0: 86.1, 1: 85.9, 2: 86.0})
        >>> iv.format(2), iv.n, iv.method
        ('5.00 [4.75, 5.25]', 3, 't')
        >>> verdict(iv, direction="greater")
        'holds'
    """
    confidence = _check_confidence(confidence)
    if method != "t":
        raise ValueError(f"method must be 't', got {method!r}: with 3-5 seeds bootstrap percentiles are degenerate")
    xa, xb = _paired_values(a, b)
    d = xa - xb
    n = len(d)
    _need_seeds(n)
    sd = float(np.std(d, ddof=1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    est = float(np.mean(d))
    return Interval(est, est - half, est + half, n, "t", confidence, sd=sd, se=se, df=float(n - 1))


def unpaired_difference(a: Any, b: Any, *, confidence: float = 0.95) -> Interval:
    """Difference of means $\\bar a - \\bar b$ of two cells not paired by seed, with Welch's t interval.

    $$\\bar a - \\bar b \\pm t_{1-\\alpha/2,\\,\\nu}\\, \\mathrm{se}, \\qquad
      \\mathrm{se}^2 = \\frac{s_a^2}{n_a} + \\frac{s_b^2}{n_b}, \\qquad
      \\nu = \\frac{\\mathrm{se}^4}{\\frac{(s_a^2/n_a)^2}{n_a - 1} + \\frac{(s_b^2/n_b)^2}{n_b - 1}}$$

    (Welch-Satterthwaite degrees of freedom, not an integer in general). Welch rather than the pooled
    t: it does not assume both cells have the same spread, and costs almost nothing when they do.
    When both sides are constant ($\\mathrm{se} = 0$) the interval is the point $\\bar a - \\bar b$ and
    $\\nu = n_a + n_b - 2$. Dicts are accepted (their values are used; keys are only for messages).

    Example:
        >>> iv = unpaired_difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # se^2 = 1/3 + 1/3, nu = 4
        >>> iv.format(3), iv.df
        ('-3.000 [-5.267, -0.733]', 4.0)
    """
    confidence = _check_confidence(confidence)
    xa, xb = _side(a, "a"), _side(b, "b")
    for x, what in ((xa, "side a of an unpaired difference"), (xb, "side b of an unpaired difference")):
        _need_seeds(len(x), what)
    na, nb = len(xa), len(xb)
    va, vb = float(np.var(xa, ddof=1)) / na, float(np.var(xb, ddof=1)) / nb
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1)) if se > 0 else float(na + nb - 2)
    half = t_quantile(0.5 + confidence / 2, df) * se
    est = float(np.mean(xa) - np.mean(xb))
    return Interval(est, est - half, est + half, (na, nb), "welch", confidence, se=se, df=df)


def ratio_of_medians(
    num_times: Sequence[float],
    den_times: Sequence[float],
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
    paired: bool | None = None,
) -> Interval:
    """$\\mathrm{median}(num) / \\mathrm{median}(den)$ with a percentile bootstrap interval over repeats.

    Each of `n_boot` resamples draws repeats with replacement and computes the ratio of the medians;
    the interval is the $\\alpha/2$ and $1-\\alpha/2$ quantiles of those ratios (numpy's default
    linear interpolation), the estimate the ratio on the data itself. `paired` (default: when both
    lists have the same length, as `normlab.bench.compare` gives) resamples repeat *indices* jointly:
    repeat $r$ timed both candidates back to back, so a slow repeat (another process, a clock change)
    slows both and cancels in the ratio. `paired=False` resamples each side independently (timings
    from separate runs). Deterministic for a given `seed` (a `numpy.random.Generator`).

    Times must be positive and finite; each side needs at least 3 repeats (the recorded profiles time
    21-51). With few repeats the bootstrap of a median is coarse and somewhat too narrow, which is one
    more reason to time more repeats rather than to trust a tight interval from 3.

    Example:
        >>> den = [1.00, 1.02, 0.99, 1.01, 1.03]
        >>> iv = ratio_of_medians([2 * t for t in den], den)  # paired: every resample's ratio is 2
        >>> iv.format(2), iv.method
        ('2.00 [2.00, 2.00]', 'bootstrap-paired')
    """
    confidence = _check_confidence(confidence)
    num, den = _values(num_times, "num_times"), _values(den_times, "den_times")
    for x, what in ((num, "num_times"), (den, "den_times")):
        if len(x) < 3:
            raise ValueError(f"{what} has {len(x)} repeats: time at least 3 repeats (bench.compare(repeats=...))")
        if np.any(x <= 0):
            i = int(np.argmax(x <= 0))
            raise ValueError(f"{what} at index {i} is {x[i]!r}: times must be positive seconds; re-time it")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer of at least 100 (10000 is the default), got {n_boot!r}")
    if paired is None:
        paired = len(num) == len(den)
    elif paired and len(num) != len(den):
        raise ValueError(f"paired=True needs one time per repeat on each side, got {len(num)} and {len(den)}: "
                         "pass paired=False for timings not interleaved repeat by repeat")
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, len(num), size=(n_boot, len(num)))
        ratios = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)
    else:
        i_num = rng.integers(0, len(num), size=(n_boot, len(num)))
        i_den = rng.integers(0, len(den), size=(n_boot, len(den)))
        ratios = np.median(num[i_num], axis=1) / np.median(den[i_den], axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    est = float(np.median(num) / np.median(den))
    n = len(num) if paired else (len(num), len(den))
    return Interval(est, float(low), float(high), n, "bootstrap-paired" if paired else "bootstrap", confidence)


# --- verdicts --------------------------------------------------------------------------------------------


def verdict(interval: Interval, *, direction: str = "greater", threshold: float = 0.0,
            margin: float | None = None) -> str:
    """The verdict on a claim about the estimate, from its interval `[low, high]`: a `MEASURED_VERDICTS` word.

    `threshold` is the reference value: 0 for a difference, 1 for a ratio, or the smallest effect the
    claim asserts. The rule, for each kind of claim (`direction`):

    - `"greater"`, the claim "the effect is larger than `threshold`":
      **holds** if `low > threshold`; **does not hold** if `high <= threshold` (the whole interval is at
      or below it: the effect is smaller than claimed, or on the other side); **within noise** otherwise
      (the interval straddles the threshold).
    - `"less"`, "the effect is smaller than `threshold`": the mirror image. **holds** if
      `high < threshold`; **does not hold** if `low >= threshold`; **within noise** otherwise.
    - `"two-sided"`, "there is a difference from `threshold`": **holds** if the interval excludes
      `threshold`. Without `margin` it can never **not hold**: an interval containing the threshold is
      **within noise** (no evidence of a difference is not evidence of none). With `margin`, it **does
      not hold** if the whole interval lies inside `(threshold - margin, threshold + margin)`, i.e.
      any difference is shown to be smaller than the margin.
    - `"equivalent"`, "A is as good as B, within ±`margin`" (`margin` required): **holds** if the
      whole interval lies inside `(threshold - margin, threshold + margin)`; **does not hold** if it lies
      entirely outside (`high <= threshold - margin` or `low >= threshold + margin`); **within noise**
      otherwise (it overlaps an edge of the band).

    Examples (differences, threshold 0):
        >>> iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 3, "t", 0.95)
        >>> verdict(iv(4.75, 5.25)), verdict(iv(4.75, 5.25), direction="less")
        ('holds', 'does not hold')
        >>> verdict(iv(-0.3, 0.4)), verdict(iv(-0.3, 0.4), direction="two-sided")
        ('within noise', 'within noise')
        >>> verdict(iv(0.2, 0.8), threshold=1.0)  # "better by more than 1 point": positive, but less than 1
        'does not hold'
        >>> verdict(iv(-0.3, 0.4), direction="equivalent", margin=0.5)
        'holds'
        >>> verdict(iv(-0.3, 0.7), direction="equivalent", margin=0.5)  # overlaps the edge 0.5
        'within noise'
        >>> verdict(iv(0.6, 0.9), direction="equivalent", margin=0.5)  # wholly outside (-0.5, 0.5)
        'does not hold'

    For a ratio of times, "A takes less time than B" is `verdict(ratio_of_medians(a, b), direction="less",
    threshold=1.0)`; "A takes at least 20% less time" uses `threshold=0.8`.
    """
    low, high = float(interval.low), float(interval.high)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"interval must have finite low <= high, got [{low}, {high}]: build it with "
                         "paired_difference, unpaired_difference or ratio_of_medians")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}, got {direction!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (0 for a difference, 1 for a ratio), got {threshold!r}")
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive finite number (the half-width of the band), got {margin!r}")
    if direction in ("greater", "less") and margin is not None:
        raise ValueError(f"margin is for 'two-sided' and 'equivalent' claims; for a {direction!r} claim put the "
                         "smallest effect that matters in threshold")
    if direction == "equivalent" and margin is None:
        raise ValueError("an 'equivalent' claim needs margin=...: the largest difference that still counts as equal")

    if direction == "greater":
        return HOLDS if low > threshold else DOES_NOT_HOLD if high <= threshold else WITHIN_NOISE
    if direction == "less":
        return HOLDS if high < threshold else DOES_NOT_HOLD if low >= threshold else WITHIN_NOISE
    inside = margin is not None and threshold - margin < low and high < threshold + margin
    if direction == "two-sided":
        return HOLDS if (low > threshold or high < threshold) else DOES_NOT_HOLD if inside else WITHIN_NOISE
    outside = high <= threshold - margin or low >= threshold + margin
    return HOLDS if inside else DOES_NOT_HOLD if outside else WITHIN_NOISE


#: The book's minimum number of seeds for a verdict on a difference of trained runs. Below it a
#: difference is still shown with its interval (from 2 seeds on), but judged "not tested here": two
#: seeds give a t interval with one degree of freedom, which a single unlucky seed can swing.
MIN_SEEDS = 3


def seed_verdict(interval: Interval | None, *, min_seeds: int = MIN_SEEDS, **rule: Any) -> str:
    """`verdict(interval, **rule)` for a difference over the seeds of trained runs: `NOT_TESTED` when
    there is no interval yet (`None`) or it rests on fewer than `min_seeds` seeds (for an unpaired
    interval, on either side). Every chapter's verdict rows on trained runs use it, so a partial record
    never gives a verdict from fewer seeds than the book's minimum.

        >>> iv = lambda n: Interval(-2.0, -3.0, -1.0, n, "t", 0.95)
        >>> seed_verdict(iv(3), direction="less"), seed_verdict(iv(2), direction="less"), seed_verdict(None)
        ('holds', 'not tested here', 'not tested here')
    """
    if not isinstance(min_seeds, int) or min_seeds < 2:
        raise ValueError(f"min_seeds must be an integer of at least 2 (an interval needs 2 seeds), got {min_seeds!r}")
    if interval is None:
        return NOT_TESTED
    n = min(interval.n) if isinstance(interval.n, tuple) else interval.n
    return NOT_TESTED if n < min_seeds else verdict(interval, **rule)


#: The widest line a chapter's output shows unwrapped: cell outputs wrap (book/_static/normlab.css),
#: and the book's column holds about 73 characters of code font in a 1200-pixel-wide window.
TABLE_WIDTH = 72


def verdict_table(rows: Iterable[Sequence[Any]], *, digits: int = 3, width: int | None = TABLE_WIDTH) -> str:
    """Fixed-width text lines for `(claim, interval, verdict)` rows, with a header; what a chapter prints.

    Numbers are rounded to `digits` decimals; the output depends only on the rows. `interval` may be
    None only for a `NOT_TESTED` row. Verdicts must be in `VERDICTS`. A table wider than `width`
    characters would wrap in the book, so each claim then gets a line of its own, with its numbers
    (still aligned as columns) indented on the next; `width=None` keeps one line per claim.

    Example:
        >>> iv = Interval(5.0, 4.75, 5.25, 3, "t", 0.95)
        >>> print(verdict_table([("GN beats BN", iv, "holds"), ("GN helps at 64", None, NOT_TESTED)]))
        claim           estimate  interval        n  method  verdict
        GN beats BN        5.000  [4.750, 5.250]  3  95% t   holds
        GN helps at 64         -  -               -  -       not tested here
        >>> print(verdict_table([("GN beats BN at a batch of 2 images per worker", iv, "holds")]))
        claim
          estimate  interval        n  method  verdict
        GN beats BN at a batch of 2 images per worker
             5.000  [4.750, 5.250]  3  95% t   holds
    """
    cells = [("claim", "estimate", "interval", "n", "method", "verdict")]
    for row in rows:
        if len(row) != 3:
            raise ValueError(f"each row is (claim, interval, verdict), got {len(row)} items: {row!r}")
        claim, iv, word = row
        check_verdict(word)
        if iv is None:
            if word != NOT_TESTED:
                raise ValueError(f"row {claim!r} says {word!r} without an interval: pass the interval, "
                                 f"or say {NOT_TESTED!r}")
            cells.append((str(claim), "-", "-", "-", "-", word))
        else:
            cells.append((str(claim), _fmt(iv.estimate, digits), f"[{_fmt(iv.low, digits)}, {_fmt(iv.high, digits)}]",
                          _fmt_n(iv.n), f"{iv.confidence:.0%} {iv.method}", word))
    right = (False, True, False, True, False, False)

    def columns(first: int) -> list[str]:
        widths = [max(len(c[j]) for c in cells) for j in range(6)]
        return ["  ".join(c[j].rjust(widths[j]) if right[j] else c[j].ljust(widths[j])
                          for j in range(first, 6)).rstrip() for c in cells]

    lines = columns(0)
    if width is None or max(map(len, lines)) <= width:
        return "\n".join(lines)
    return "\n".join(f"{c[0]}\n  {numbers}" for c, numbers in zip(cells, columns(1)))


# --- summaries -------------------------------------------------------------------------------------------


class Quartiles(NamedTuple):
    median: float
    q25: float
    q75: float


def median_iqr(values: Sequence[float]) -> Quartiles:
    """Median and quartiles of `values`: `statistics.median` and `statistics.quantiles(n=4)`.

    The quartiles use the standard library's default "exclusive" method (positions $(n+1)p$ in the
    sorted values, linearly interpolated); a single value is its own median and quartiles.
    `normlab.bench.summarize` reports these.

    Example:
        >>> median_iqr([1, 2, 3, 4, 5])
        Quartiles(median=3, q25=1.5, q75=4.5)
    """
    values = list(values)
    if not values:
        raise ValueError("median_iqr() needs at least one value: time at least one repeat")
    if len(values) == 1:
        return Quartiles(values[0], values[0], values[0])
    q = statistics.quantiles(values, n=4)
    return Quartiles(statistics.median(values), q[0], q[2])


# --- the Student t quantile ------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function $I_x(a, b)$."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
    """$P(T > t)$ for $t \\ge 0$: $\\tfrac12 I_{\\nu/(\\nu + t^2)}(\\nu/2, 1/2)$."""
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The $p$ quantile of Student's t distribution with `df` degrees of freedom (any real `df > 0`).

    Solves $P(T > t) = 1 - p$ by bisection on $t$, with the tail written as a regularized incomplete
    beta function, $P(T > t) = \\tfrac12 I_{\\nu/(\\nu+t^2)}(\\nu/2, \\tfrac12)$. Against scipy's
    `t.ppf` it agrees to 1e-12 relative for `df <= 1000` and 1e-8 beyond (`math.lgamma` cancellation),
    for `p` from 1e-10 to 1 - 1e-8. `df=math.inf` gives the normal quantile.

    Example:
        >>> round(t_quantile(0.975, 2), 6), round(t_quantile(0.975, 10), 3), round(t_quantile(0.975, math.inf), 3)
        (4.302653, 2.228, 1.96)
    """
    if not 0 < p < 1:
        raise ValueError(f"p must lie strictly between 0 and 1 (e.g. 0.975), got {p!r}")
    if not df > 0:  # also refuses NaN
        raise ValueError(f"df must be positive (n - 1 for n seeds), got {df!r}: record at least 2 values")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    # solve in the smaller tail, so that p = 1e-10 is not first rounded through 1 - p
    tail = min(p, 1.0 - p)
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t
