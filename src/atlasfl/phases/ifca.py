"""IFCA's two rules (Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020) as pure functions: a client's choice among the k cluster models, and the seeding of the k models."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lowest(losses: Sequence[float]) -> int:
    """ĵ = argmin_j L_i(θ_j): the index of the smallest loss (the first one on ties)."""
    return int(np.argmin(np.asarray(losses, dtype=np.float64)))


def farthest_seeds(points: np.ndarray, k: int, seed: int) -> list[int]:
    """k distinct rows of `points` by k-means++ seeding: the first uniformly, each next with probability ∝ its
    squared distance to the nearest row chosen so far (uniform among the rest where all of those are 0)."""
    if not 1 <= k <= len(points):
        raise ValueError(f"cannot seed {k} clusters from {len(points)} points")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(points)))]
    nearest = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    while len(chosen) < k:
        weights = nearest.copy()
        weights[chosen] = 0.0
        if weights.sum() <= 0:
            weights = np.ones(len(points))
            weights[chosen] = 0.0
        chosen.append(int(rng.choice(len(points), p=weights / weights.sum())))
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
    return chosen
