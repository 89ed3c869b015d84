"""Task clustering of client fingerprints on the server (DESIGN §3.1).

Fingerprints are centred across clients first: the component shared by all text otherwise
dominates cosine similarity and every client looks alike. k is chosen by cosine silhouette over
seeded k-means runs, with an explicit test for k=1 (all clients alike).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

# Both thresholds are parameters to be calibrated on real fingerprints; these are starting points.
SILHOUETTE_THRESHOLD = 0.2  # below it no k ≥ 2 partition is convincing: one cluster
DISPERSION_THRESHOLD = 0.05  # mean ‖f_k − f̄‖ / ‖f̄‖ below it: raw fingerprints nearly identical
# Clients of one task spread about (K−1)/K × the sampling noise of a mean; different tasks far more.
NOISE_RATIO = 3.0


@dataclass
class ClusterResult:
    """The chosen partition and the numbers that led to it."""

    k: int
    labels: list[int]
    silhouette: float | None  # of the chosen partition; None when k = 1
    method: str  # 'kmeans', or 'single:<reason>' with reason few-clients | dispersion | silhouette
    similarity: list[list[float]]  # cosine similarity of the centred fingerprints (K×K)
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    dispersion: float = 0.0
    spread_to_noise: float | None = None  # between-client spread over sampling noise (None: not measured)


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


def cluster_fingerprints(
    F: np.ndarray,
    *,
    seed: int,
    kmax: int | None = None,
    n_init: int = 20,
    silhouette_threshold: float = SILHOUETTE_THRESHOLD,
    dispersion_threshold: float = DISPERSION_THRESHOLD,
    noise: float | None = None,
    noise_ratio: float = NOISE_RATIO,
) -> ClusterResult:
    """Cluster K fingerprints (K×d); deterministic given `seed`. kmax defaults to min(8, K−1).

    `noise`, when the clients measured it, is the mean sampling variance (trace) of one client's
    fingerprint, i.e. how far two clients drawing from the same data would sit apart by chance.
    If the clients spread no more than `noise_ratio` times that, they are one cluster (k=1).
    """
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] == 0:
        raise ValueError(f"fingerprints must be a non-empty K×d array, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("fingerprints contain NaN or infinite values")
    num_clients = F.shape[0]
    X = centred_unit_rows(F)
    similarity = (X @ X.T).tolist()
    dispersion = relative_dispersion(F)
    spread = float(((F - F.mean(axis=0)) ** 2).sum(axis=1).mean())
    spread_to_noise = spread / noise if noise else None
    distinct = len(np.unique(X, axis=0))  # k-means cannot find more clusters than distinct points
    kmax = min(8 if kmax is None else kmax, num_clients - 1, distinct)

    scores: dict[int, float] = {}
    partitions: dict[int, list[int]] = {}
    for k in range(2, kmax + 1):
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(X)
        found = len(set(labels.tolist()))
        if 2 <= found <= num_clients - 1:  # silhouette is defined only here
            scores[k] = float(silhouette_score(X, labels, metric="cosine"))
            partitions[k] = canonical_labels(labels)

    def single(reason: str) -> ClusterResult:
        return ClusterResult(1, [0] * num_clients, None, f"single:{reason}", similarity, scores, dispersion,
                             spread_to_noise)

    if not scores:
        return single("few-clients")
    if spread_to_noise is not None and spread_to_noise < noise_ratio:
        return single("noise")
    if dispersion < dispersion_threshold:
        return single("dispersion")
    best_k = max(scores, key=lambda k: (scores[k], -k))  # ties go to the smaller k
    if scores[best_k] < silhouette_threshold:
        return single("silhouette")
    return ClusterResult(best_k, partitions[best_k], scores[best_k], "kmeans", similarity, scores, dispersion,
                         spread_to_noise)


def adjusted_rand(labels: Sequence[int], truth: Sequence[int]) -> float:
    """Adjusted Rand index of a partition against the true tasks (1.0 = identical up to names)."""
    return float(adjusted_rand_score(list(truth), list(labels)))
