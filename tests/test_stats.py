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
    assert s.half_width == pytest.approx(half)  # the error bar report draws


def test_summary_small_samples():
    assert stats.summarize([]) == stats.Summary(0, None, None, None, None)
    assert stats.summarize([7.0]) == stats.Summary(1, 7.0, None, None, None)
    assert stats.summarize([7.0]).half_width is None and stats.summarize([5.0, 5.0]).half_width == 0.0
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
    assert d.method == "welch" and d.n == (4, 5) and d.lo < 0 < d.hi
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



def _head(d):
    """What an exact difference must get right: effect, interval, n, method and p (se, df and TOST follow from them)."""
    return (d.effect, d.lo, d.hi, d.n, d.method, d.p)


def test_contrast_takes_two_values_per_sample_and_is_exact_without_spread():
    two = stats.contrast([[1.0, 3.0], [0.0, 0.0]], (1, -1))  # the fewest values that have a variance
    half = sps.t.ppf(0.975, 1) * 1.0  # sd sqrt(2), n 2: se 1; df (1)^2 / (1 / 1) = 1
    assert two.n == (2, 2) and two.effect == 2.0 and (two.lo, two.hi) == pytest.approx((2 - half, 2 + half))
    exact = stats.contrast([[5.0, 5.0], [2.0, 2.0, 2.0]], (1, -1))  # every seed agrees in every sample
    assert _head(exact) == (3.0, 3.0, 3.0, (2, 3), "welch contrast", 0.0)
    same = stats.contrast([[4.0, 4.0], [4.0, 4.0]], (1, -1))
    assert _head(same) == (0.0, 0.0, 0.0, (2, 2), "welch contrast", 1.0)
    # Weights that are not +-1: 0.5*mean(a) - 0.25*mean(b), with its variance scaled by the squared weights.
    a, b = [1.0, 2.0, 3.0], [2.0, 6.0]
    w = stats.contrast([a, b], (0.5, -0.25))
    va, vb = 0.25 * 1.0 / 3, 0.0625 * 8.0 / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert w.effect == pytest.approx(0.0) and (w.lo, w.hi) == pytest.approx((-half, half))


def test_paired_drops_incomplete_pairs_and_is_exact_without_spread():
    nan, inf = float("nan"), float("inf")
    # Only whole, finite pairs count: (10, 9) and (14, 11); a missing or non-finite value on either side drops its pair.
    d = stats.paired([10.0, None, 12.0, 14.0, nan, 1.0], [9.0, 5.0, None, 11.0, 3.0, inf])
    ref = sps.ttest_rel([10.0, 14.0], [9.0, 11.0])
    assert d.n == (2,) and d.effect == pytest.approx(2.0)
    assert (d.lo, d.hi) == pytest.approx(tuple(ref.confidence_interval(0.95))) and d.p == pytest.approx(ref.pvalue)
    assert stats.paired([10.0, None], [9.0, 8.0]) is None  # one pair has no spread to estimate
    assert _head(stats.paired([3.0, 5.0], [1.0, 3.0])) == (2.0, 2.0, 2.0, (2,), "paired t", 0.0)
    assert _head(stats.paired([3.0, 5.0], [3.0, 5.0])) == (0.0, 0.0, 0.0, (2,), "paired t", 1.0)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's reference, on an arm without spread
def test_welch_edges_two_values_and_no_spread():
    two = stats.welch([1.0, 3.0], [0.0, 2.0])
    ref = sps.ttest_ind([1.0, 3.0], [0.0, 2.0], equal_var=False)
    assert two.n == (2, 2) and (two.lo, two.hi) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert stats.welch([1.0, 3.0], [2.0]) is None
    assert _head(stats.welch([5.0, 5.0], [2.0, 2.0, 2.0])) == (3.0, 3.0, 3.0, (2, 3), "welch", 0.0)
    assert _head(stats.welch([4.0, 4.0], [4.0, 4.0])) == (0.0, 0.0, 0.0, (2, 2), "welch", 1.0)
    # One arm without spread (every run at chance) is still an estimate with an interval, not an exact value.
    for a, b in (([10.0, 10.0, 10.0], [50.0, 60.0, 70.0]), ([50.0, 60.0, 70.0], [10.0, 10.0, 10.0])):
        d, ref = stats.welch(a, b), sps.ttest_ind(a, b, equal_var=False)
        assert d.lo < d.effect < d.hi and (d.lo, d.hi) == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_nearly_identical_values_are_data_not_errors():
    """scipy warns (precision loss) when a sample is nearly constant; the statistics stay usable."""
    assert stats.paired([50.0, 50.0, 50.000000000000014], [0.0, 0.0, 0.0]).effect == pytest.approx(50.0)
    assert stats.welch([50.0, 50.0, 50.000000000000014], [0.0, 0.0, 0.0]).effect == pytest.approx(50.0)


def test_permutation_splits_are_drawn_once_per_sample_size_and_cannot_be_changed():
    import numpy as np

    sampled, exact = stats._splits(10, 10)  # C(20, 10) > 20000: a fixed random sample
    assert not exact and sampled.shape == (20000, 10)
    assert stats._splits(10, 10)[0] is sampled  # kept, not drawn again
    fresh, _ = stats._splits.__wrapped__(10, 10)  # what a new draw gives: the same sample
    assert np.array_equal(fresh, sampled)
    assert all((np.diff(row) > 0).all() for row in sampled[:50]) and sampled.min() >= 0 and sampled.max() < 20
    with pytest.raises(ValueError):
        sampled[0, 0] = 5  # shared between calls, so read-only
    every, exact = stats._splits(3, 3)
    assert exact and len(every) == math.comb(6, 3) and not every.flags.writeable
    a, b = [1.0, 2.0, 2.0, 3.0, 1.0, 2.0, 3.0, 2.0, 1.0, 2.0], [3.0, 4.0, 3.0, 3.0, 4.0, 2.0, 4.0, 3.0, 3.0, 4.0]
    assert stats.permutation(a, b, 1.0, 4.0) == stats.permutation(a, b, 1.0, 4.0)
