"""The statistics behind every report and verdict, checked on numbers worked out by hand."""

import math

import pytest
from scipy import stats as sps

from bnctl import stats


def test_summary_mean_sample_std_and_t_interval():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, None, float("nan")])  # missing and non-finite values are left out
    assert s.n == 4 and s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # sample std (ddof=1), not population std
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, df=3) * s / sqrt(n)
    assert (s.lo, s.hi) == pytest.approx((2.5 - half, 2.5 + half))


def test_summary_small_samples():
    assert stats.summarize([]) == stats.Summary(0, None, None, None, None)
    assert stats.summarize([7.0]) == stats.Summary(1, 7.0, None, None, None)
    assert stats.summarize([5.0, 5.0, 5.0]) == stats.Summary(3, 5.0, 0.0, 5.0, 5.0)


def test_welch_matches_the_welch_satterthwaite_interval():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    d = stats.welch(a, b)
    va, vb = (5 / 3) / 4, 10.0 / 5  # variance of each mean
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.effect == pytest.approx(-3.5)
    assert (d.lo, d.hi) == pytest.approx((-3.5 - half, -3.5 + half))
    assert d.p == pytest.approx(2 * sps.t.sf(3.5 / math.sqrt(va + vb), df))
    assert d.method == "welch" and d.n == (4, 5) and not d.excludes_zero()
    assert stats.welch([1.0], [2.0, 3.0]) is None  # one value has no variance


def test_paired_interval_uses_the_differences():
    d = stats.paired([10.0, 12.0, 14.0], [9.0, 10.0, 11.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * 1 / sqrt(3)
    assert d.effect == pytest.approx(2.0)
    assert (d.lo, d.hi) == pytest.approx((2.0 - half, 2.0 + half))
    # Welch on the same numbers ignores the pairing and is much wider.
    assert stats.welch([10.0, 12.0, 14.0], [9.0, 10.0, 11.0]).lo < d.lo


def test_contrast_of_two_samples_is_welch_and_of_four_the_satterthwaite_interval():
    a, b = [61.2, 55.0, 70.3, 64.4], [40.1, 52.2, 47.7, 39.0, 58.8, 44.4]
    d, ref = stats.contrast([a, b], (1, -1)), sps.ttest_ind(a, b, equal_var=False)
    assert (d.lo, d.hi) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert d.p == pytest.approx(ref.pvalue) and d.n == (4, 6)
    # A difference in differences: (mean 2 - mean 5) - (mean 3 - mean 4) = -3 - (-1) = -2; each sample's
    # mean has variance 1/3 (sd 1, n=3), so se = 2/sqrt(3) and df = (4/3)^2 / (4 * (1/3)^2 / 2) = 8.
    dd = stats.contrast([[1, 2, 3], [4, 5, 6], [2, 3, 4], [3, 4, 5]], (1, -1, -1, 1))
    half = sps.t.ppf(0.975, 8) * 2 / math.sqrt(3)
    assert dd.effect == pytest.approx(-2.0) and (dd.lo, dd.hi) == pytest.approx((-2 - half, -2 + half))
    assert stats.contrast([[1.0], [2.0, 3.0]], (1, -1)) is None


def test_bootstrap_is_reproducible_and_brackets_the_effect():
    import numpy as np

    def diff(a, b, axis=-1):
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    apart = stats.bootstrap([[10.0, 11.0, 12.0], [1.0, 2.0, 3.0]], diff)
    assert apart.effect == pytest.approx(9.0) and apart.lo > 0 and apart.lo <= 9.0 <= apart.hi
    # Resampling 3 values: the extreme means are 10 and 12, minus 1 and 3, so the interval lies within [7, 11].
    assert 7.0 <= apart.lo and apart.hi <= 11.0
    assert stats.bootstrap([[10.0, 11.0, 12.0], [1.0, 2.0, 3.0]], diff) == apart
    overlap = stats.bootstrap([[1.0, 5.0, 9.0], [2.0, 6.0, 7.0]], diff)
    assert overlap.lo < 0 < overlap.hi
    assert stats.bootstrap([[1.0], [2.0, 3.0]], diff) is None
