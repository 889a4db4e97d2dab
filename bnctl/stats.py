"""Statistics over seeds: summaries with t-intervals, Welch and paired comparisons, linear contrasts.

Every number a user draws a conclusion from comes with its n and a 95% interval. The
quantiles and tests are scipy.stats'; nothing here re-derives them. Pure Python + scipy:
no torch, so reports run anywhere.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95  # every interval bnctl reports is a 95% interval


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
    method: str  # "welch", "paired t" or "welch contrast"
    p: float | None = None  # two-sided p-value


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


def welch(a: Sequence[float], b: Sequence[float]) -> Difference | None:
    """mean(a) - mean(b) with the 95% interval of Welch's unequal-variance t-test; None below 2 values per arm."""
    import numpy as np
    from scipy import stats

    xa, xb = np.asarray(_finite(a)), np.asarray(_finite(b))
    if len(xa) < 2 or len(xb) < 2:
        return None
    effect = float(xa.mean() - xb.mean())
    if xa.std() == 0 and xb.std() == 0:  # no spread in either arm: the difference is exact
        return Difference(effect, effect, effect, (len(xa), len(xb)), "welch", 0.0 if effect else 1.0)
    with warnings.catch_warnings():  # one arm with identical values (all at chance) is valid data, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(xa, xb, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    return Difference(effect, float(ci.low), float(ci.high), (len(xa), len(xb)), "welch", float(res.pvalue))


def paired(a: Sequence[float], b: Sequence[float]) -> Difference | None:
    """mean(a - b) over pairs (the same run measured two ways) with the paired t-test's 95% interval."""
    import numpy as np
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    xa, xb = np.asarray(pairs).T
    d = xa - xb
    effect = float(d.mean())
    if d.std() == 0:
        return Difference(effect, effect, effect, (len(d),), "paired t", 0.0 if effect else 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(xa, xb)
    ci = res.confidence_interval(CONFIDENCE)
    return Difference(effect, float(ci.low), float(ci.high), (len(d),), "paired t", float(res.pvalue))


def contrast(samples: Sequence[Sequence[float]], weights: Sequence[float]) -> Difference | None:
    """sum(w_i * mean_i) over independent samples with a Welch-Satterthwaite 95% t-interval; None below 2 values each.

    With two samples and weights (1, -1) this is Welch's test exactly. The t-quantile is scipy's; the
    interval covers 95% with few seeds per cell, where a percentile bootstrap is far too narrow.
    """
    import numpy as np
    from scipy import stats

    data = [np.asarray(_finite(x)) for x in samples]
    if any(len(x) < 2 for x in data):
        return None
    w = np.asarray(weights, dtype=float)
    effect = float(sum(wi * x.mean() for wi, x in zip(w, data)))
    terms = np.array([wi ** 2 * x.var(ddof=1) / len(x) for wi, x in zip(w, data)])
    n = tuple(len(x) for x in data)
    if terms.sum() == 0:  # no spread in any sample: the contrast is exact
        return Difference(effect, effect, effect, n, "welch contrast", 0.0 if effect else 1.0)
    se = float(np.sqrt(terms.sum()))
    df = float(terms.sum() ** 2 / sum(t ** 2 / (len(x) - 1) for t, x in zip(terms, data)))
    lo, hi = stats.t.interval(CONFIDENCE, df=df, loc=effect, scale=se)
    return Difference(effect, float(lo), float(hi), n, "welch contrast", float(2 * stats.t.sf(abs(effect) / se, df)))

