"""Task clustering of client fingerprints on the server (docs/design.md §3.1); the derivation is in docs/clustering.md.

The rule, with the clients' sampling noise (representation fingerprints, the default):

- Client i uploads its fingerprint f_i, the label-balanced mean of its sketched example representations
  (the mean over the L_i labels it holds of each label's mean: clients of one task with different label
  mixes then share one expectation, where the plain mean would follow each client's mix and split the
  task), σ²_i (the sampling variance of f_i: tr S_w · Σ_l (1/n_l) / L_i², S_w the pooled within-label
  covariance), n_i (that variance's degrees of freedom plus one, examples less labels plus one) and r_i,
  the effective number of dimensions of that noise ((tr Σ)² / tr Σ², 1 … fingerprint_dim); and each label's
  mean and count. Labels it holds fewer than 3 examples of are left out of all of these.
- For each k = 1 … kmax, a partition P_k: seeded k-means with many inits, on the centred fingerprints
  and on their unit-length rows, keeping whichever of the two is tighter.
- Its spread-to-noise ratio  T_k = Σ_i ‖f_i − f̄_c(i)‖² / Σ_c (1 − 1/n_c) Σ_{i∈c} σ²_i : the within-cluster
  spread over its expectation when every cluster holds clients of one task (clients of one task differ
  only by sampling). Each cluster is compared on the labels all its members hold (`SamplingNoise.members`):
  a client that lacks a label sits at the mean of the others, away from its task's (label skew).
- When every cluster is one task, T_k is a ratio of two noisy quadratic forms whose degrees of freedom
  follow from (σ²_i, n_i, r_i) (Satterthwaite): ν₁ ≈ (K − k)·r for the spread, ν₂ ≈ Σ_i (n_i − 1)·r for the
  noise estimate, so T_k ~ F(ν₁, ν₂). Its critical value c_k is the F quantile at 1 − SIGNIFICANCE: large
  when few clients or few examples stand behind the fingerprints, near 1 when many do (no floor: see docs).
- k is the smallest k with T_k ≤ c_k (k = 1 is the explicit test "all clients alike").
- Every k with T_k ≤ c_k passes, finer partitions whenever a right one does (splitting a task by noise leaves
  T near 1), so passing alone does not say that k + 1 also fits. The split test does: the
  spread P_{k+1} removes from P_k over what removing one noise contrast is expected to,
  G_k = (S_k − S_{k+1}) / (E_k − E_{k+1}), F(ν_G, ν₂) when P_k is right (ν_G from the same Satterthwaite
  variances). k is **ambiguous** when G_k exceeds its F quantile at 1 − AMBIGUITY / M (M the splits k-means
  chose among): the next larger k explains more than noise would, though T_k passed.
- The margin is how far the decision sits from flipping or from ambiguity, in ln units of a statistic over its
  critical value: min(ln c_k − ln T_k, ln T_{k−1} − ln c_{k−1}, ln g_k − ln G_k); negative when ambiguous.

Without a noise figure (gradient fingerprints), k is the best cosine silhouette (k = 1 when the raw
fingerprints hardly differ or no partition is convincing), its margin in silhouette units. Fingerprints are
always centred first: the component shared by all text otherwise dominates and every client looks alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import f as f_distribution
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

SILHOUETTE_THRESHOLD = 0.2  # below it no k ≥ 2 partition is convincing: one cluster (gradient fingerprints)
DISPERSION_THRESHOLD = 0.05  # mean ‖f_k − f̄‖ / ‖f̄‖ below it: raw fingerprints nearly identical
# Chance that a right partition's T exceeds its critical value, i.e. that noise alone splits a task (module docstring).
SIGNIFICANCE = 0.001
AMBIGUITY = 0.05  # most often a right partition is flagged ambiguous (k + 1 also fits): a warning's usual level
MAX_DOF = 1e9  # degrees of freedom beyond this give the F quantile's limit to float precision


@dataclass(frozen=True)
class SamplingNoise:
    """What each client says about the noise of its fingerprint (one entry per client), and optionally the
    per-label means behind it, which let a cluster be scored on the labels all its members hold."""

    variance: np.ndarray  # σ²_i: trace of the sampling covariance of f_i
    count: np.ndarray  # n_i: degrees of freedom of σ²_i plus one (examples behind f_i less its labels, plus one)
    dims: np.ndarray  # r_i: effective dimensions of that noise, (tr Σ)² / tr Σ²
    label_means: np.ndarray | None = None  # K×L×d: client i's mean of label l (zero where it holds none)
    label_counts: np.ndarray | None = None  # K×L: the examples behind each (0: label not held)

    @classmethod
    def of(cls, variance, count, dims, num_clients: int, label_means=None, label_counts=None) -> SamplingNoise:
        """Broadcast to one entry per client and check: finite, σ² ≥ 0, n ≥ 1, r ≥ 1; label counts ≥ 0, at
        least one label per client, label means finite and of the same number of labels."""
        arrays = [np.broadcast_to(np.asarray(x, dtype=np.float64), (num_clients,)) for x in (variance, count, dims)]
        if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[0] < 0):
            raise ValueError("noise must be finite and non-negative")
        if np.any(arrays[1] < 1) or np.any(arrays[2] < 1):
            raise ValueError("noise counts and effective dimensions must be at least 1")
        if label_means is None:
            return cls(*arrays)
        means, counts = np.asarray(label_means, dtype=np.float64), np.asarray(label_counts, dtype=np.float64)
        if means.ndim != 3 or counts.shape != means.shape[:2] or len(counts) != num_clients:
            raise ValueError(f"label means {means.shape} and counts {counts.shape} must be K×L×d and K×L")
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(counts))) or np.any(counts < 0):
            raise ValueError("label means must be finite and label counts non-negative")
        if not np.all((counts > 0).any(axis=1)):
            raise ValueError("every client must hold at least one label")
        return cls(*arrays, means, counts)

    def members(self, F: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The members' fingerprints and variances as the rule compares them. With per-label means and a label
        every member holds: each member's balanced mean over the labels all of them hold, with its variance
        tr S_w,i Σ_l (1/n_il) / L_c² (tr S_w,i = σ²_i L_i² / Σ_{l held} 1/n_il, the pooled within-label trace
        behind σ²_i), so a member that lacks a label its mates hold is compared on what they share, not taken
        for another task. Otherwise (no label held by all) the uploaded fingerprints and σ²."""
        counts = None if self.label_counts is None else self.label_counts[members]
        shared = None if counts is None else (counts > 0).all(axis=0)
        if shared is None or not shared.any():
            return F[members], self.variance[members]
        inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
        within_trace = self.variance[members] * (counts > 0).sum(axis=1) ** 2 / inverse.sum(axis=1)
        return (self.label_means[members][:, shared].mean(axis=1),
                within_trace * inverse[:, shared].sum(axis=1) / shared.sum() ** 2)


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
    threshold_by_k: dict[int, float] = field(default_factory=dict)  # c_k: critical value of T_k (one task per cluster)
    dof_by_k: dict[int, tuple[float, float]] = field(default_factory=dict)  # (ν₁, ν₂) behind c_k
    margin: float | None = None  # distance of the decision from its nearest alternative, in `margin_units`
    margin_units: str = ""
    partitions_by_k: dict[int, list[int]] = field(default_factory=dict)
    passing_k: list[int] = field(default_factory=list)  # every k with T_k ≤ c_k
    ambiguous: bool | None = None  # the split test says k + 1 also fits (None: no noise rule, or no k + 1)
    split: dict | None = None  # that test: G_k (`statistic`), its bar (`threshold`), `dof`, `splits`, `k_next`


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


def scatter(F: np.ndarray) -> float:
    """Σ over rows of the squared distance to their mean."""
    return float(((F - F.mean(axis=0)) ** 2).sum())


def within_cluster_spread(F: np.ndarray, labels: Sequence[int]) -> float:
    """Σ over clients of the squared distance to their cluster's mean."""
    labels = np.asarray(labels)
    return sum(scatter(F[labels == c]) for c in np.unique(labels))


def clusters(F: np.ndarray, labels: Sequence[int], noise: SamplingNoise):
    """Each cluster's (members, fingerprints, variances) as the rule compares them (`SamplingNoise.members`):
    the views of a partition that `spread_to_noise` and `null_dof` score."""
    labels = np.asarray(labels)
    return [(idx, *noise.members(F, idx)) for idx in (labels == c for c in np.unique(labels))]


def expected_spread(views) -> float:
    """Σ_c (1 − 1/n_c) Σ_{i∈c} σ²_i: the within-cluster spread's expectation when each cluster is one task."""
    return float(sum((1 - 1 / len(var)) * var.sum() for _, _, var in views))


def spread_to_noise(views) -> float:
    """T of a partition (its `clusters` views): the within-cluster spread over `expected_spread`."""
    expected = expected_spread(views)
    return sum(scatter(f) for _, f, _ in views) / expected if expected > 0 else math.inf


def null_dof(views, noise: SamplingNoise) -> tuple[float, float]:
    """Satterthwaite degrees of freedom (ν₁, ν₂) of T's numerator and denominator when each cluster is one task
    and examples are Gaussian: ν = 2·E²/Var of each quadratic form. With q_i = σ⁴_i / r_i = tr Cov(f_i)²,
    Var(spread) = 2 Σ_c Σ_{i,j∈c} P_ij² √(q_i q_j) (P the cluster's centring matrix) and
    Var(σ²_i) = 2 q_i / (n_i − 1) (Wishart). `views`: the partition's `clusters`."""
    var_spread = var_noise = 0.0
    for idx, _, var in views:
        m = len(var)
        q = var ** 2 / noise.dims[idx]
        P = np.eye(m) - 1 / m
        var_spread += 2 * float((P ** 2 * np.sqrt(np.outer(q, q))).sum())
        var_noise += (1 - 1 / m) ** 2 * float((2 * q / np.maximum(noise.count[idx] - 1, 1)).sum())
    expected = expected_spread(views)
    return tuple(min(2 * expected ** 2 / v, MAX_DOF) if v > 0 else MAX_DOF for v in (var_spread, var_noise))


def split_test(views, finer, noise: SamplingNoise, significance: float = AMBIGUITY) -> dict | None:
    """Does partition `finer` (P_{k+1}'s views) explain more spread than splitting one task of `views` (P_k) by
    noise? G = (S_k − S_{k+1}) / (E_k − E_{k+1}): the spread it removes over the one noise contrast it should
    remove. When P_{k+1} refines P_k the removed part is orthogonal to what stays, so its variance is
    Var S_k − Var S_{k+1} and its Satterthwaite ν_G = 2 (E_k − E_{k+1})² / that; the denominator's ν₂ is P_k's.
    k-means picks the split that removes most, so the bar is the F quantile at 1 − significance / M, M the
    splits it could pick (Σ_c 2^(m_c − 1) − 1; a union bound): a right P_k is flagged at most that often.
    None when the finer partition removes no expected spread (possible only where it is not a refinement)."""
    (nu_k, nu_noise), (nu_finer, _) = null_dof(views, noise), null_dof(finer, noise)
    expected, expected_finer = expected_spread(views), expected_spread(finer)
    removed_var = 2 * (expected ** 2 / nu_k - expected_finer ** 2 / nu_finer)
    if expected - expected_finer <= 0 or removed_var <= 0:
        return None
    removed = sum(scatter(f) for _, f, _ in views) - sum(scatter(f) for _, f, _ in finer)
    dof = (min(2 * (expected - expected_finer) ** 2 / removed_var, MAX_DOF), nu_noise)
    splits = sum(2.0 ** (len(var) - 1) - 1 for _, _, var in views)
    return dict(statistic=removed / (expected - expected_finer), dof=list(dof), splits=splits,
                threshold=float(f_distribution.isf(significance / splits, *dof)))


def critical_ratio(dof: tuple[float, float], significance: float = SIGNIFICANCE) -> float:
    """The T a right partition exceeds with probability `significance`: the F(ν₁, ν₂) quantile."""
    return float(f_distribution.ppf(1 - significance, *dof))


def cluster_fingerprints(
    F: np.ndarray,
    *,
    seed: int,
    kmax: int | None = None,
    n_init: int = 20,
    silhouette_threshold: float = SILHOUETTE_THRESHOLD,
    dispersion_threshold: float = DISPERSION_THRESHOLD,
    noise: SamplingNoise | None = None,
    significance: float = SIGNIFICANCE,
) -> ClusterResult:
    """Cluster K fingerprints (K×d); deterministic given `seed`. kmax defaults to min(8, K−1).

    With `noise` (each client's sampling noise of its fingerprint) k follows the spread-to-noise rule of the
    module docstring, without it the silhouette rule.
    """
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] == 0:
        raise ValueError(f"fingerprints must be a non-empty K×d array, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("fingerprints contain NaN or infinite values")
    num_clients = F.shape[0]
    if noise is not None and len(noise.variance) != num_clients:
        raise ValueError(f"noise has {len(noise.variance)} entries for {num_clients} fingerprints")
    use_noise = noise is not None and noise.variance.sum() > 0
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
    views = {k: clusters(F, p, noise) for k, p in partitions.items()} if use_noise else {}
    tightness = {k: spread_to_noise(v) for k, v in views.items()}
    dofs = {k: null_dof(v, noise) for k, v in views.items()}
    thresholds = {k: critical_ratio(dof, significance) for k, dof in dofs.items()}
    passing = [k for k in sorted(tightness) if tightness[k] <= thresholds[k]]

    def result(k: int, method: str, margin: float | None, units: str, split: dict | None = None) -> ClusterResult:
        ambiguous = None if split is None else split["statistic"] > split["threshold"]
        return ClusterResult(k, partitions[k], scores.get(k), method, similarity, scores, dispersion,
                             tightness.get(1), tightness, thresholds, dofs, margin, units, partitions, passing,
                             ambiguous, split)

    if not scores:
        return result(1, "single:few-clients", None, "")
    if passing:
        k = passing[0]
        split = split_test(views[k], views[k + 1], noise) if k + 1 in views else None
        margins = [math.log(thresholds[k] / tightness[k])]
        if k > 1:
            margins.append(math.log(tightness[k - 1] / thresholds[k - 1]))
        if split is not None:
            split["k_next"] = k + 1
            margins.append(math.log(split["threshold"] / split["statistic"]) if split["statistic"] > 0 else math.inf)
        units = ("ln statistic over its critical value: min(ln c_k - ln T_k, ln T_(k-1) - ln c_(k-1), "
                 "ln g_k - ln G_k)")
        return result(k, "single:noise" if k == 1 else "kmeans:noise-consistent", min(margins), units, split)
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
