"""The second look (docs/clustering.md#the-second-look): after round 1 the server tests phase 1's partition against
the cosine geometry of the clients' round-1 updates, as pure functions over the uploads and their similarities.

An update is the client's change of each adapted weight, ΔW = (α/r)·B·A per module, flattened and concatenated:
exactly what round 1 moved the effective weight by, since B starts at zero (PEFT), so the server needs no start
state; a method that uploads B alone (A frozen at one seeded start) is compared on B. Each update is taken at unit
length v_i, so ‖v_i − v_j‖² = 2 − 2 s_ij and everything below is a function of the cosine matrix S.

For two groups P, Q of clients (n = |P| + |Q| ≥ 3), the one-task model (v_i = μ + e_i, e_i independent noise of r
effective dimensions and one variance) gives the two-group ANOVA ratio

    F(P, Q) = [|P||Q|/n · ‖v̄_P − v̄_Q‖²] / [(SS_P + SS_Q) / (n − 2)]   ~  F(r, (n − 2)·r)   (r cancels),

SS the groups' scatter about their own means. r is estimated as (tr Σ)² / tr Σ² of the within-group residuals
of the partition with the split made, both terms with their Wishart bias removed and tr Σ² at its upper confidence
bound (`effective_dims`): few clients leave r uncertain, and the bar is then higher. The rule:

- **split** a phase-1 cluster into its complete-linkage bipartition by update cosine (`phases.cfl.bipartition`)
  when F exceeds its F quantile at 1 − SIGNIFICANCE / M, M = 2^(n−1) − 1 the bipartitions it could have picked
  (a union bound, as phase 1's split test): noise alone splits a one-task cluster at most that often.

It never merges phase 1's clusters. Phase 1 kept the smallest k its noise model allows, so the fingerprints
rejected merging them; updates that show no difference (F near 1) are absence of evidence, which cannot
overrule that, and no F is evidence of sameness beyond the noise.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import chi2
from scipy.stats import f as f_distribution

SIGNIFICANCE = 0.001  # phase 1's: most often noise alone splits a one-task cluster
DIMS_CONFIDENCE = 0.05  # r̂ is taken at its lower bound of this level: it enters the split bar
MAX_DIMS = 1e6  # beyond it the F quantile hardly moves


def round1_updates(uploads: dict[int, dict[str, torch.Tensor]], alpha: float) -> dict[int, torch.Tensor]:
    """Each client's round-1 update as one float64 vector: (α/r)·B·A per module where A is uploaded, else B."""
    out = {}
    for cid, state in uploads.items():
        parts = []
        for key in sorted(k for k in state if k.startswith("lora::") and k.endswith("::B")):
            B = state[key].double()
            A = state.get(key[:-1] + "A")
            parts.append((B if A is None else alpha / A.shape[0] * B @ A.double()).flatten())
        out[cid] = torch.cat(parts)
    return out


def cosine_matrix(updates: Sequence[torch.Tensor]) -> np.ndarray:
    """S_ij = cos(u_i, u_j) (0 against a zero update)."""
    stacked = torch.stack(list(updates))
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ unit.T).numpy()


def scatter(S: np.ndarray, group: Sequence[int]) -> float:
    """Σ_{i∈g} ‖v_i − v̄_g‖² = n − (1/n) Σ_{i,j∈g} S_ij for unit rows."""
    g = list(group)
    return len(g) - float(S[np.ix_(g, g)].sum()) / len(g)


def anova_ratio(S: np.ndarray, P: Sequence[int], Q: Sequence[int]) -> float:
    """F(P, Q) of the module docstring (inf when both groups have no scatter and their means differ)."""
    p, q = list(P), list(Q)
    n = len(p) + len(q)
    gap = S[np.ix_(p, p)].mean() + S[np.ix_(q, q)].mean() - 2 * S[np.ix_(p, q)].mean()
    between = len(p) * len(q) / n * max(float(gap), 0.0)
    within = (scatter(S, p) + scatter(S, q)) / (n - 2)
    if within <= 1e-12:
        return 0.0 if between <= 1e-12 else float("inf")
    return between / within


def effective_dims(S: np.ndarray, labels: Sequence[int]) -> float:
    """r̂ = (tr Σ)² / tr Σ² of the within-cluster noise, from the residuals about each cluster's mean (via their Gram
    matrix G, ν = clients − clusters degrees of freedom), with the Wishart bias of tr G² and (tr G)² removed (the
    plain ratio of the residuals' scatter is at most ν, far below the dimensions an update's noise spreads over);
    then lowered to a one-sided bound: tr Σ² is in effect the mean square of the ν(ν − 1)/2 residual cross products,
    each of variance tr Σ², so it is taken at its upper DIMS_CONFIDENCE bound (a χ² with that many degrees of
    freedom), which keeps a few clients' noisy r̂ from lowering the split bar. At least 1, and 1 where there are
    no residuals."""
    labels = np.asarray(labels)
    n = len(labels)
    H = np.zeros((n, n))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        H[np.ix_(idx, idx)] = 1 / len(idx)
    R = np.eye(n) - H
    G = R @ S @ R
    nu = n - len(np.unique(labels))
    if nu < 2:
        return 1.0
    trace, square = float(np.trace(G)) / nu, float((G ** 2).sum()) / nu ** 2  # tr S, tr S² of S = C / ν
    tr_sigma2 = nu ** 2 / ((nu - 1) * (nu + 2)) * (square - trace ** 2 / nu)
    pairs = nu * (nu - 1) / 2
    upper = max(tr_sigma2, 0.0) * pairs / chi2.ppf(DIMS_CONFIDENCE, pairs)  # tr Σ²'s one-sided upper bound
    if upper <= 1e-24:
        return MAX_DIMS
    return float(np.clip((trace ** 2 - 2 / nu * upper) / upper, 1.0, MAX_DIMS))


def split_bar(n: int, dims: float, significance: float = SIGNIFICANCE) -> float:
    """The F a one-task cluster of n clients' best bipartition exceeds at most with probability `significance`."""
    splits = 2.0 ** (n - 1) - 1
    return float(f_distribution.isf(significance / splits, dims, (n - 2) * dims))


def refine(S: np.ndarray, labels: Sequence[int], significance: float = SIGNIFICANCE) -> dict:
    """Phase 1's `labels` (client order of S) tested against the updates' cosines S: the refined labels
    (canonical: 0, 1, … in order of first appearance), each split test (with the r̂ it used: that of the partition
    with its split made), and phase 1's partition's r̂."""
    from atlasfl.phases.cfl import bipartition
    from atlasfl.phases.clustering import canonical_labels

    groups: list[list[int]] = []
    splits = []
    for c in dict.fromkeys(labels):
        members = [i for i, label in enumerate(labels) if label == c]
        if len(members) < 3:
            groups.append(members)
            continue
        first, second = bipartition(S[np.ix_(members, members)])
        if not second:  # every member alike: nothing to split
            groups.append(members)
            continue
        P, Q = [members[i] for i in first], [members[i] for i in second]
        finer = [max(labels) + 1 if i in Q else label for i, label in enumerate(labels)]
        split_dims = effective_dims(S, finer)  # the noise if the split is right: no task contrast left in it
        ratio, bar = anova_ratio(S, P, Q), split_bar(len(members), split_dims, significance)
        split = ratio > bar
        splits.append(dict(members=members, parts=[P, Q], statistic=ratio, threshold=bar, effective_dims=split_dims,
                           split=split))
        groups += [P, Q] if split else [members]
    refined = [0] * len(labels)
    for j, group in enumerate(groups):
        for i in group:
            refined[i] = j
    return dict(labels=canonical_labels(refined), splits=splits,
                effective_dims=effective_dims(S, labels), significance=significance)
