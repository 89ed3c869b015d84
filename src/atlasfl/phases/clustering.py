"""Task clustering of client fingerprints on the server (DESIGN §3.1).

The rule, with the clients' sampling noise (representation fingerprints, the default):

- Client i uploads its fingerprint f_i (the mean of n_i sketched example representations) and σ²_i, the
  sampling variance of that mean (trace of the examples' covariance over n_i).
- For each k = 1 … kmax, a partition P_k: seeded k-means with many inits, on the centred fingerprints
  and on their unit-length rows, keeping whichever of the two is tighter.
- Its spread-to-noise ratio  T_k = Σ_i ‖f_i − f̄_c(i)‖² / Σ_c (1 − 1/n_c) Σ_{i∈c} σ²_i : the within-cluster
  spread over what it is in expectation when every cluster holds clients of one task (clients of one
  task differ only by sampling). A right partition has T ≈ 1; a partition that merges two tasks a, b
  adds about (n_a n_b / (n_a + n_b)) ‖μ_a − μ_b‖² to the numerator, and that term grows with the
  examples behind each fingerprint while the noise shrinks as 1/n.
- k is the smallest k with T_k ≤ NOISE_RATIO = 2 (k = 1 is the explicit test "all clients alike").
- The margin is how far the decision sits from flipping, in log units of T:
  min(ln 2 − ln T_k, ln T_{k−1} − ln 2). ln T_k near 0 means the clusters are exactly as tight as noise.
  A margin of 0.2 means one of the two nearest partitions is 20 % away from being chosen instead.

Why 2 and not the former 1.5: what moves T is the sampling noise. With 64 examples of MiniLM's last hidden
state a merge of two offline tasks sat at T = 1.47 (seed 4) while right partitions reached 1.45, so no
threshold was safe. The representation now pools the output of block ⌈L/3⌉ over up to 512 training
examples (`federation.client`). Measured on seeds 0–49 (docs/clustering.md, `benchmarks/clustering.py`):
right partitions stay at T ≤ 1.34 (MiniLM, offline tasks) and ≤ 1.61 (tiny models, generated tasks);
the nearest merge sits at T ≥ 2.36 for MiniLM with only 72 examples per client, ≥ 4.5 for the tiny
models, and ≥ 10.5 for MiniLM at the preset sizes (seeds 0–49). 2 sits between with room on both sides, and the
merge side grows with the examples. Still fragile: very few clients with few examples (4 clients of 22
examples on 32-wide random models: a right partition's T exceeded 2 on 4 of 60 cases, 3 of them split).

Without a noise figure (gradient fingerprints), k is the best cosine silhouette, with k = 1 when the raw
fingerprints hardly differ (dispersion) or no partition is convincing; its margin is in silhouette units.
Fingerprints are always centred first: the component shared by all text otherwise dominates cosine
similarity and every client looks alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

SILHOUETTE_THRESHOLD = 0.2  # below it no k ≥ 2 partition is convincing: one cluster (gradient fingerprints)
DISPERSION_THRESHOLD = 0.05  # mean ‖f_k − f̄‖ / ‖f̄‖ below it: raw fingerprints nearly identical
NOISE_RATIO = 2.0  # the largest spread-to-noise ratio T a partition may have and count as one task per cluster


@dataclass
class ClusterResult:
    """The chosen partition and the numbers that led to it."""

    k: int
    labels: list[int]
    silhouette: float | None  # of the chosen partition; None when k = 1
    method: str  # 'kmeans:noise-consistent' | 'kmeans:silhouette' | 'single:<reason>' (noise, few-clients, ...)
    similarity: list[list[float]]  # cosine similarity of the centred fingerprints (K×K)
    silhouette_by_k: dict[int, float] = field(default_factory=dict)  # of the very partitions in partitions_by_k
    dispersion: float = 0.0
    spread_to_noise: float | None = None  # T_1: all clients' spread over its one-task expectation (None: no noise)
    tightness_by_k: dict[int, float] = field(default_factory=dict)  # T_k of each k's partition
    margin: float | None = None  # distance of the decision from its nearest alternative, in `margin_units`
    margin_units: str = ""
    partitions_by_k: dict[int, list[int]] = field(default_factory=dict)


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Relabel clusters 0, 1, … in order of first appearance, so partitions compare directly."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(label), len(mapping)) for label in labels]


def relative_dispersion(F: np.ndarray) -> float:
    """mean_k ‖f_k − f̄‖ / ‖f̄‖: how far clients sit from their common centre, scale-free."""
    centre = F.mean(axis=0)
    spread = float(np.linalg.norm(F - centre, axis=1).mean())
    norm = float(np.linalg.norm(centre))
    if norm == 0:
        return 0.0 if spread == 0 else float("inf")
    return spread / norm


def centred_unit_rows(F: np.ndarray) -> np.ndarray:
    """Subtract the mean over clients, then scale each row to unit length (zero rows stay zero)."""
    X = F - F.mean(axis=0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def within_cluster_spread(F: np.ndarray, labels: Sequence[int]) -> float:
    """Σ over clients of the squared distance to their cluster's mean."""
    labels = np.asarray(labels)
    return float(sum(((F[labels == c] - F[labels == c].mean(axis=0)) ** 2).sum() for c in np.unique(labels)))


def spread_to_noise(F: np.ndarray, labels: Sequence[int], noise: np.ndarray) -> float:
    """T of a partition: its within-cluster spread over the spread expected when each cluster is one task,
    Σ_c (1 − 1/n_c) Σ_{i∈c} σ²_i, with σ²_i client i's sampling variance (trace) of its fingerprint."""
    labels = np.asarray(labels)
    expected = sum((1 - 1 / (labels == c).sum()) * noise[labels == c].sum() for c in np.unique(labels))
    return within_cluster_spread(F, labels) / expected if expected > 0 else math.inf


def cluster_fingerprints(
    F: np.ndarray,
    *,
    seed: int,
    kmax: int | None = None,
    n_init: int = 20,
    silhouette_threshold: float = SILHOUETTE_THRESHOLD,
    dispersion_threshold: float = DISPERSION_THRESHOLD,
    noise: float | Sequence[float] | None = None,
    noise_ratio: float = NOISE_RATIO,
) -> ClusterResult:
    """Cluster K fingerprints (K×d); deterministic given `seed`. kmax defaults to min(8, K−1).

    `noise` is each client's sampling variance of its fingerprint (one number for all, or one per
    client); with it k follows the spread-to-noise rule of the module docstring, without it the
    silhouette rule.
    """
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] == 0:
        raise ValueError(f"fingerprints must be a non-empty K×d array, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("fingerprints contain NaN or infinite values")
    num_clients = F.shape[0]
    sigma2 = None if noise is None else np.broadcast_to(np.asarray(noise, dtype=np.float64), (num_clients,))
    if sigma2 is not None and not (np.all(np.isfinite(sigma2)) and np.all(sigma2 >= 0)):
        raise ValueError("noise must be finite and non-negative")
    use_noise = sigma2 is not None and sigma2.sum() > 0
    X = centred_unit_rows(F)
    Fc = F - F.mean(axis=0)
    similarity = (X @ X.T).tolist()
    dispersion = relative_dispersion(F)
    distinct = len(np.unique(X, axis=0))  # k-means cannot find more clusters than distinct points
    kmax = min(8 if kmax is None else kmax, num_clients - 1, distinct)

    partitions: dict[int, list[int]] = {1: [0] * num_clients}
    for k in range(2, kmax + 1):
        candidates = [KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(X)]
        if use_noise:  # T is measured in the fingerprints' own space: k-means there may find a tighter partition
            candidates.append(KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(Fc))
        labels = min(candidates, key=lambda lab: within_cluster_spread(F, lab))
        if 2 <= len(set(labels.tolist())) <= num_clients - 1:  # silhouette is defined only here
            partitions[k] = canonical_labels(labels)
    # Scored after the partitions are final, so silhouette_by_k[k] is the silhouette of partitions[k].
    scores = {k: float(silhouette_score(X, p, metric="cosine")) for k, p in partitions.items() if k > 1}
    tightness = {k: spread_to_noise(F, p, sigma2) for k, p in partitions.items()} if use_noise else {}

    def result(k: int, method: str, margin: float | None, units: str) -> ClusterResult:
        return ClusterResult(k, partitions[k], scores.get(k), method, similarity, scores, dispersion,
                             tightness.get(1), tightness, margin, units, partitions)

    if not scores:
        return result(1, "single:few-clients", None, "")
    if tightness:
        consistent = [k for k in sorted(tightness) if tightness[k] <= noise_ratio]
        if consistent:
            k = consistent[0]
            margins = [math.log(noise_ratio / tightness[k])]
            if k > 1:
                margins.append(math.log(tightness[k - 1] / noise_ratio))
            units = f"ln spread-to-noise: min(ln {noise_ratio:g} - ln T_k, ln T_(k-1) - ln {noise_ratio:g})"
            return result(k, "single:noise" if k == 1 else "kmeans:noise-consistent", min(margins), units)
    if dispersion < dispersion_threshold:
        return result(1, "single:dispersion", math.log(dispersion_threshold / max(dispersion, 1e-300)),
                      f"ln {dispersion_threshold:g} - ln dispersion")
    best_k = max(scores, key=lambda k: (scores[k], -k))  # ties go to the smaller k
    runner_up = max([v for k, v in scores.items() if k != best_k], default=-1.0)
    if scores[best_k] < silhouette_threshold:
        return result(1, "single:silhouette", silhouette_threshold - scores[best_k],
                      f"silhouette: {silhouette_threshold:g} - best silhouette")
    return result(best_k, "kmeans:silhouette", min(scores[best_k] - runner_up, scores[best_k] - silhouette_threshold),
                  f"silhouette: min(best - runner-up, best - {silhouette_threshold:g})")


def adjusted_rand(labels: Sequence[int], truth: Sequence[int]) -> float:
    """Adjusted Rand index of a partition against the true tasks (1.0 = identical up to names)."""
    return float(adjusted_rand_score(list(truth), list(labels)))
