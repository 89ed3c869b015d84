"""The second look's rule (`phases.second_look`) on constructed updates: its statistics are the two-group ANOVA of the
unit updates, a merge of two tasks is split, a right partition is kept, noise alone splits nothing, and phase 1's
clusters are never merged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.phases.second_look import (
    anova_ratio,
    cosine_matrix,
    effective_dims,
    refine,
    round1_updates,
    scatter,
    split_bar,
)


def _updates(tasks: list[int], noise: float, seed: int, dim: int = 400) -> np.ndarray:
    """One update per client: its task's mean direction (independent Gaussian per task) plus isotropic noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((max(tasks) + 1, dim))
    return means[tasks] + noise * rng.standard_normal((len(tasks), dim))


def _S(U: np.ndarray) -> np.ndarray:
    return cosine_matrix([torch.from_numpy(u) for u in U])


def test_the_ratio_is_the_two_group_anova_of_the_unit_updates():
    U = _updates([0, 0, 0, 1, 1], noise=1.0, seed=3)
    V = U / np.linalg.norm(U, axis=1, keepdims=True)
    P, Q = [0, 1, 2], [3, 4]
    ss = lambda g: float(((V[g] - V[g].mean(axis=0)) ** 2).sum())  # noqa: E731
    between = len(P) * len(Q) / 5 * float(((V[P].mean(axis=0) - V[Q].mean(axis=0)) ** 2).sum())
    S = _S(U)
    assert scatter(S, P) == pytest.approx(ss(P))
    assert anova_ratio(S, P, Q) == pytest.approx(between / ((ss(P) + ss(Q)) / 3))


def test_effective_dims_estimate_the_noise_dimensions_beyond_the_residuals_rank():
    # 40 clients of 4 tasks, isotropic noise in 50 dimensions: the residuals' own ratio is at most their rank (36);
    # the bias-corrected one comes out near the noise's 50 dimensions (of the unit updates: a little fewer).
    rng = np.random.default_rng(1)
    tasks = np.repeat(np.arange(4), 10)
    U = np.zeros((40, 60))
    U[:, :4] = 10 * np.eye(4)[tasks]
    U[:, 10:] = rng.standard_normal((40, 50))
    assert 35 < effective_dims(_S(U), tasks) < 65
    assert effective_dims(_S(U), list(range(40))) == 1.0  # no residuals: the most conservative bar


def test_a_merge_of_two_tasks_is_split():
    U = _updates([0, 0, 0, 1, 1, 1, 2, 2, 2], noise=1.0, seed=0)
    found = refine(_S(U), [0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert found["labels"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = found["splits"][0]
    assert first["split"] and first["statistic"] > first["threshold"]


def test_a_right_partition_is_kept():
    tasks = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for seed in range(20):
        found = refine(_S(_updates(tasks, noise=1.0, seed=seed)), tasks)
        assert found["labels"] == tasks, seed
        assert not any(s["split"] for s in found["splits"])


def test_noise_alone_never_splits_a_task():
    # One task of 6 clients whose updates differ only by noise, at noise levels from small to dominant.
    for seed in range(30):
        for noise in (0.3, 1.0, 3.0):
            found = refine(_S(_updates([0] * 6, noise=noise, seed=seed)), [0] * 6)
            assert found["labels"] == [0] * 6, (seed, noise)


def test_phase1_clusters_are_never_merged_even_when_their_updates_coincide():
    # Three noise vectors of equal length summing to zero in each half, orthogonal to the task's direction μ:
    # both halves' unit means are exactly μ's (F = 0), yet phase 1's fingerprints kept them apart.
    mu, e1, e2, e3, e4 = np.eye(5)
    star = [(1.0, 0.0), (-0.5, np.sqrt(3) / 2), (-0.5, -np.sqrt(3) / 2)]
    U = np.stack([mu + 0.5 * (a * e1 + b * e2) for a, b in star] + [mu + 0.5 * (a * e3 + b * e4) for a, b in star])
    S = _S(U)
    assert anova_ratio(S, [0, 1, 2], [3, 4, 5]) == pytest.approx(0.0, abs=1e-12)
    found = refine(S, [0, 0, 0, 1, 1, 1])
    assert found["labels"] == [0, 0, 0, 1, 1, 1] and "merges" not in found


def test_the_split_bar_grows_with_the_splits_to_choose_from_and_shrinks_with_noise_dims():
    from scipy.stats import f

    assert split_bar(6, 2.0) > f.isf(0.001, 2.0, 8.0)  # 31 bipartitions to pick from: above the one-split bar
    assert split_bar(6, 50.0) < split_bar(6, 2.0)


def test_a_round1_update_is_the_scaled_product_of_b_and_a_or_b_alone():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    both = round1_updates({0: {"lora::q::A": A, "lora::q::B": B, "head::w": torch.ones(2)}}, alpha=16.0)[0]
    assert torch.allclose(both, (8.0 * B.double() @ A.double()).flatten())
    alone = round1_updates({0: {"lora::q::B": B}}, alpha=16.0)[0]
    assert torch.equal(alone, B.double().flatten())
