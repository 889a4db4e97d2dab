"""Statistics over seeds: summaries with t-intervals, Welch and paired comparisons, linear contrasts.

Every number a user draws a conclusion from comes with its n and a 95% interval. The
quantiles and tests are scipy.stats'; nothing here re-derives them. Pure Python + scipy:
no torch, so reports run anywhere.

Accuracies on a test set of N images move in steps of 100/N points, so seeds often agree
exactly; a ``floor`` (the variance of one value's rounding, quantum**2 / 12) keeps an
interval from collapsing to zero width when they do.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95  # every interval bnctl reports is a 95% interval
ALPHA = 1 - CONFIDENCE  # the family-wise error rate of a study's verdicts
POWER = 0.8  # the power at which a minimum detectable effect is quoted


def quantum_floor(quantum: float | None) -> float:
    """The variance of rounding one value to a multiple of quantum (uniform error): quantum**2 / 12."""
    return 0.0 if not quantum else quantum ** 2 / 12


@dataclass(frozen=True)
class Summary:
    """One cell's metric over seeds: n, mean, sample std (ddof=1) and the 95% t-interval of the mean."""

    n: int
    mean: float | None
    std: float | None  # None with fewer than 2 values
    lo: float | None  # interval bounds; None with fewer than 2 values
    hi: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2


@dataclass(frozen=True)
class Difference:
    """An estimate of a difference (effect) with its 95% interval and the test behind it."""

    effect: float
    lo: float
    hi: float
    n: tuple[int, ...]  # sample sizes behind the estimate
    method: str  # "welch", "paired t", "welch contrast" or "permutation"
    p: float | None = None  # two-sided p-value
    se: float | None = None  # standard error (t-based methods; a normal approximation for permutation)
    df: float | None = None  # degrees of freedom of the t reference (inf: normal)
    lo90: float | None = None  # the 90% interval: two one-sided 5% tests of equivalence (TOST)
    hi90: float | None = None
    min_p: float = 0.0  # the smallest p-value the test can give with these sample sizes (permutation tests)

    def equivalent_within(self, bound: float) -> bool:
        """TOST at 5%: the 90% interval lies inside (-bound, +bound)."""
        return self.lo90 is not None and -bound < self.lo90 and self.hi90 < bound


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarize(values: Sequence[float | None]) -> Summary:
    """Mean, sample std and 95% t-interval of the finite values (missing or non-finite ones are left out)."""
    import numpy as np
    from scipy import stats

    xs = np.asarray(_finite(values))
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = float(xs.mean())
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = float(xs.std(ddof=1))
    if std == 0.0:  # every seed agrees: the interval collapses onto the mean (scipy would return nan)
        return Summary(n, mean, 0.0, mean, mean)
    lo, hi = stats.t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=stats.sem(xs))
    return Summary(n, mean, std, float(lo), float(hi))


def welch(a: Sequence[float], b: Sequence[float], floor: float = 0.0) -> Difference | None:
    """mean(a) - mean(b) with the 95% interval of Welch's unequal-variance t-test; None below 2 values per arm.

    floor: the least variance one value can have (quantum_floor); without one, arms with no spread give an exact difference.
    """
    d = contrast([a, b], (1, -1), floor)
    return None if d is None else Difference(d.effect, d.lo, d.hi, d.n, "welch", d.p, d.se, d.df, d.lo90, d.hi90)


def paired(a: Sequence[float], b: Sequence[float], floor: float = 0.0) -> Difference | None:
    """mean(a - b) over pairs (the same run measured two ways) with the paired t-test's 95% interval.

    floor: the least variance of one value (quantum_floor); a difference of two rounded values has twice it.
    """
    import numpy as np
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    xa, xb = np.asarray(pairs).T
    d = xa - xb
    n, effect = len(d), float(d.mean())
    var = max(float(d.var(ddof=1)), 2 * floor)
    if var == 0:
        return Difference(effect, effect, effect, (n,), "paired t", 0.0 if effect else 1.0, 0.0, n - 1.0,
                          effect, effect)
    return _t_difference(effect, math.sqrt(var / n), n - 1.0, (n,), "paired t")


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with df degrees of freedom (the normal's for df = inf); scipy's special functions."""
    from scipy import special

    return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))


def _t_difference(effect: float, se: float, df: float, n: tuple[int, ...], method: str) -> Difference:
    from scipy import special

    h95, h90 = t_quantile(1 - ALPHA / 2, df) * se, t_quantile(1 - ALPHA, df) * se
    z = abs(effect) / se
    p = float(2 * (special.ndtr(-z) if math.isinf(df) else special.stdtr(df, -z)))
    return Difference(effect, effect - h95, effect + h95, n, method, p, se, df, effect - h90, effect + h90)


def contrast(samples: Sequence[Sequence[float]], weights: Sequence[float], floor: float = 0.0) -> Difference | None:
    """sum(w_i * mean_i) over independent samples with a Welch-Satterthwaite 95% t-interval; None below 2 values each.

    With two samples and weights (1, -1) this is Welch's test exactly. The t-quantile is scipy's; the
    interval covers 95% with few seeds per cell, where a percentile bootstrap is far too narrow.
    floor: the least variance of one value (quantum_floor), applied to every sample.
    """
    import numpy as np

    data = [np.asarray(_finite(x)) for x in samples]
    if any(len(x) < 2 for x in data):
        return None
    w = np.asarray(weights, dtype=float)
    effect = float(sum(wi * x.mean() for wi, x in zip(w, data)))
    terms = np.array([wi ** 2 * max(float(x.var(ddof=1)), floor) / len(x) for wi, x in zip(w, data)])
    n = tuple(len(x) for x in data)
    if terms.sum() == 0:  # no spread in any sample and no floor: the contrast is exact
        return Difference(effect, effect, effect, n, "welch contrast", 0.0 if effect else 1.0, 0.0, math.inf,
                          effect, effect)
    se = float(np.sqrt(terms.sum()))
    used = [(t, len(x)) for t, x in zip(terms, data) if t > 0]
    df = float(terms.sum() ** 2 / sum(t ** 2 / (k - 1) for t, k in used))
    return _t_difference(effect, se, df, n, "welch contrast")


def mde(d: Difference, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true effect a two-sided test at level alpha detects with the given power, at this standard error.

    (t_{1-alpha/2} + t_{power}) * se with the estimate's degrees of freedom; None when the test cannot reach
    alpha at all with these sample sizes (a permutation test's smallest p-value) or has no standard error.
    """
    if d.se is None or d.min_p > alpha or d.se == 0:
        return None
    df = d.df if d.df is not None else math.inf
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * d.se


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control for any dependence), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@functools.lru_cache(maxsize=32)
def _splits(n_a: int, n_b: int, limit: int = 20000, seed: int = 0):
    """Index sets of group a for every split of n_a + n_b values (all of them up to limit, else a fixed random sample).

    A pure function of its arguments, so it is kept per sample size (a report tests many sections at the
    same seed counts; drawing a sample takes longer than the test) and handed out read-only.
    """
    import itertools

    import numpy as np

    n = n_a + n_b
    if math.comb(n, n_a) <= limit:
        splits, exact = np.array(list(itertools.combinations(range(n), n_a))), True
    else:
        rng = np.random.default_rng(seed)  # deterministic: the same data give the same p-value
        splits, exact = np.array([np.sort(rng.permutation(n)[:n_a]) for _ in range(limit)]), False
    splits.setflags(write=False)
    return splits, exact


def _perm_p(a, b, splits, shifts):
    """Two-sided permutation p-values of mean(a - shift) - mean(b), for every shift at once."""
    import numpy as np

    n_a, n_b = len(a), len(b)
    pooled = np.concatenate([a, b])
    sums = pooled[splits].sum(axis=1)
    k = (splits < n_a).sum(axis=1)  # how many of a's values each split puts in group a
    diff0 = sums / n_a - (pooled.sum() - sums) / n_b
    slope = -k / n_a + (n_a - k) / n_b  # shifting a's values by s moves each split's difference by s * slope
    diffs = diff0[None, :] + np.asarray(shifts)[:, None] * slope[None, :]
    observed = a.mean() - np.asarray(shifts) - b.mean()
    return (np.abs(diffs) >= np.abs(observed)[:, None] - 1e-9).mean(axis=1)


def permutation(a: Sequence[float], b: Sequence[float], resolution: float, span: float) -> Difference | None:
    """mean(a) - mean(b) for ordinal values on a grid, with an exact permutation test (ties allowed).

    The interval inverts the same test over shifts of a and is then widened by half a ``resolution`` on
    each side: each value is only known to within the grid's step (interval-censored), so no interval
    is narrower than the grid can resolve. ``span`` bounds the shifts tried (the most the difference can be).
    se is the normal approximation used for the minimum detectable effect (each variance floored at
    resolution**2 / 12); min_p is the smallest p-value these sample sizes allow.
    """
    import numpy as np

    xa, xb = np.asarray(_finite(a)), np.asarray(_finite(b))
    if len(xa) < 2 or len(xb) < 2:
        return None
    splits, exact = _splits(len(xa), len(xb))
    effect = float(xa.mean() - xb.mean())
    p = float(_perm_p(xa, xb, splits, [0.0])[0])
    step = resolution / 10
    shifts = np.arange(-span - resolution, span + resolution + step / 2, step)
    pvals = _perm_p(xa, xb, splits, shifts)

    def interval(alpha: float) -> tuple[float, float]:
        kept = shifts[pvals > alpha]
        if kept.size == 0:
            kept = np.array([effect])
        return float(kept.min() - resolution / 2), float(kept.max() + resolution / 2)

    lo, hi = interval(ALPHA)
    lo90, hi90 = interval(2 * ALPHA)
    floor = resolution ** 2 / 12
    se = math.sqrt(max(float(xa.var(ddof=1)), floor) / len(xa) + max(float(xb.var(ddof=1)), floor) / len(xb))
    min_p = 2 / math.comb(len(xa) + len(xb), len(xa)) if exact else 0.0
    return Difference(effect, lo, hi, (len(xa), len(xb)), "permutation" if exact else "permutation, sampled",
                      p, se, math.inf, lo90, hi90, min_p)
