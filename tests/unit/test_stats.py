"""Report statistics against values computed by hand from their textbook formulas."""
import math

import pytest

from atlasfl.report.stats import mean_std, paired_test

# Five paired seeds; differences a − b = 0.03, 0.05, −0.01, 0.06, 0.04 (no ties, one negative).
A = [0.81, 0.85, 0.79, 0.88, 0.83]
B = [0.78, 0.80, 0.80, 0.82, 0.79]


def t4_cdf(x: float) -> float:
    """Student's t CDF for 4 degrees of freedom, closed form."""
    u = x * x / 4
    return 0.5 + 0.375 * x / math.sqrt(1 + u) * (1 - u / (3 * (1 + u)))


def test_mean_and_sample_std():
    s = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert s.mean == pytest.approx(5.0)
    assert s.std == pytest.approx(math.sqrt(32 / 7))  # squared deviations sum to 32, n − 1 = 7
    assert s.n == 8
    one = mean_std([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and one.n == 1
    assert mean_std([]) is None


def test_paired_t_wilcoxon_and_cohens_d_by_hand():
    d = [a - b for a, b in zip(A, B)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    assert t == pytest.approx(2.81387, abs=1e-4)  # 0.034 / (0.0270185 / √5)
    result = paired_test(A, B)
    assert result.n == 5
    assert result.mean_diff == pytest.approx(0.034)
    assert result.t_p == pytest.approx(2 * (1 - t4_cdf(t)), rel=1e-9)
    assert result.cohens_d == pytest.approx(mean / sd)
    assert result.cohens_d == pytest.approx(1.25840, abs=1e-4)
    # Signed ranks of |d|: only the smallest (rank 1) is negative, so W = 1. Exactly: of the 2^5 sign
    # patterns, W ≤ 1 in 2 ({} and {1}); two-sided p = 2 · 2/32.
    assert result.wilcoxon_p == pytest.approx(0.125)


def test_sign_of_the_difference_follows_argument_order():
    forward, backward = paired_test(A, B), paired_test(B, A)
    assert backward.mean_diff == pytest.approx(-forward.mean_diff)
    assert backward.cohens_d == pytest.approx(-forward.cohens_d)
    assert backward.t_p == pytest.approx(forward.t_p)


def test_identical_samples_give_undefined_tests_not_a_crash():
    r = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert r.mean_diff == 0
    assert math.isnan(r.t_p) and math.isnan(r.wilcoxon_p) and math.isnan(r.cohens_d)


def test_constant_nonzero_differences():
    r = paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert r.mean_diff == pytest.approx(0.1)
    assert math.isnan(r.t_p) and math.isnan(r.cohens_d)  # std of differences is 0
    assert r.wilcoxon_p == pytest.approx(0.25)  # all three positive: 2 · 1/8


def test_fewer_than_two_pairs_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        paired_test([0.5], [0.4])
