"""Seed-level summaries and paired tests. Undefined quantities are NaN (shown as "—"), never a crash
or a misleading 0: a std needs two values, a t-test and Cohen's d need differences that vary."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

_TOL = 1e-12  # differences this close are equal (scores are sums of floats)


@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation (ddof=1) of n values; std is NaN when n < 2."""

    mean: float
    std: float
    n: int


def mean_std(values: Iterable[float]) -> Stat | None:
    """None when there is nothing to summarise, so tables can show "—"."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return None
    return Stat(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


@dataclass(frozen=True)
class PairedTest:
    """a − b over n pairs: mean difference, two-sided p-values and the effect size d_z."""

    n: int
    mean_diff: float
    t_p: float  # paired t-test; NaN when the differences do not vary
    wilcoxon_p: float  # Wilcoxon signed-rank (zero differences dropped); NaN when all are zero
    cohens_d: float  # d_z = mean difference / sample std of the differences; NaN when they do not vary


def paired_test(a: Iterable[float], b: Iterable[float]) -> PairedTest:
    """Compare paired samples a and b (same seeds or same (seed, client) in the same order)."""
    a = np.asarray(list(a), dtype=np.float64)
    b = np.asarray(list(b), dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a paired test needs two equally long samples of at least 2 (got {a.size} and {b.size})")
    d = a - b
    varies = float(np.ptp(d)) > _TOL
    all_zero = bool(np.all(np.abs(d) <= _TOL))
    with warnings.catch_warnings():  # scipy warns on tiny samples; the p-values are still the exact ones
        warnings.simplefilter("ignore")
        t_p = float(stats.ttest_rel(a, b).pvalue) if varies else math.nan
        w_p = math.nan if all_zero else float(stats.wilcoxon(d).pvalue)
    cohens_d = float(d.mean() / d.std(ddof=1)) if varies else math.nan
    return PairedTest(int(d.size), float(d.mean()), t_p, w_p, cohens_d)
