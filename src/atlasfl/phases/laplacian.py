"""Graph-Laplacian personalisation inside a cluster (MIRA, docs/design.md §3.4).

Each client moves its own locally trained update towards its neighbours:
ΔW_k ← ΔW_k − η Σ_l a_kl (ΔW_k − ΔW_l), with a row-normalised fingerprint affinity a.
η=0 leaves every client untouched; η=1 with uniform affinity gives the cluster mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from atlasfl.errors import AtlasError
from atlasfl.phases.aggregation import (
    HEAD_PREFIX,
    LORA_PREFIX,
    check_same_keys,
    head_groups,
    lora_modules,
    mixed_svds,
    split_svd,
)

Tensor = torch.Tensor


def default_sigma(sq_dists: np.ndarray) -> float:
    """Median heuristic: the median off-diagonal squared distance, so a typical pair gets weight e⁻¹.

    It makes the kernel invariant to the fingerprints' overall scale; 1.0 when there is no spread.
    """
    k = sq_dists.shape[0]
    off_diag = sq_dists[~np.eye(k, dtype=bool)]
    sigma = float(np.median(off_diag)) if off_diag.size else 0.0
    return sigma if sigma > 0 else 1.0


def affinity(fingerprints: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Row-stochastic K×K matrix of exp(−‖f_k−f_l‖²/σ) with a_kk = 1 before normalisation."""
    f = np.asarray(fingerprints, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"fingerprints must be a non-empty K×d array, got shape {f.shape}")
    sq_norms = (f * f).sum(axis=1)
    sq_dists = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * f @ f.T, 0.0)
    np.fill_diagonal(sq_dists, 0.0)
    if sigma is None:
        sigma = default_sigma(sq_dists)
    elif not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    a = np.exp(-sq_dists / sigma)
    return a / a.sum(axis=1, keepdims=True)


def check_eta(eta: float) -> None:
    """η is a user setting (--eta, --lambda-sweep); outside [0, 1] the step overshoots the neighbours."""
    if not 0.0 <= eta <= 1.0:
        raise AtlasError(f"eta must be in [0, 1], got {eta}")


def step_coefficients(weights: np.ndarray, eta: float) -> np.ndarray:
    """C with new_k = Σ_l C_kl ΔW_l: C = I − η(diag(rowsum a) − a)."""
    a = np.asarray(weights, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"weights must be a square K×K matrix, got shape {a.shape}")
    return np.eye(a.shape[0]) - eta * (np.diag(a.sum(axis=1)) - a)


def laplacian_step(deltas: Sequence[Tensor], weights: np.ndarray, eta: float) -> list[Tensor]:
    """One Laplacian step on each client's tensor; η=0 returns the very same tensor objects."""
    check_eta(eta)
    if eta == 0:
        return list(deltas)
    coefs = step_coefficients(weights, eta)
    if coefs.shape[0] != len(deltas):
        raise ValueError(f"weights are {coefs.shape[0]}×{coefs.shape[0]} but {len(deltas)} tensors were given")
    stacked = torch.stack([d.to(torch.float64) for d in deltas])
    mixed = torch.einsum("kl,l...->k...", torch.as_tensor(coefs, device=stacked.device), stacked)
    return [m.to(d.dtype, copy=True) for m, d in zip(mixed, deltas)]  # own storage per client


def personalise_states(
    states: Sequence[dict[str, Tensor]],
    weights: np.ndarray,
    eta: float,
    *,
    alpha: float,
) -> list[dict[str, Tensor]]:
    """Apply the step to every module's ΔW_k and head; each client is refactored at its own ranks.

    `weights` is the cluster's affinity matrix. η=0 returns the input dicts themselves (no
    refactoring, so the result is exactly local training). Heads mix only among clients whose heads
    have the same shapes, with the affinity rows renormalised over that subgroup.
    """
    check_eta(eta)
    if eta == 0:
        return list(states)
    check_same_keys(states)
    coefs = step_coefficients(weights, eta)
    if coefs.shape[0] != len(states):
        raise ValueError(f"weights are {coefs.shape[0]}×{coefs.shape[0]} but {len(states)} states were given")
    out: list[dict[str, Tensor]] = [{} for _ in states]
    for module in lora_modules(states[0]):
        a_key, b_key = f"{LORA_PREFIX}{module}::A", f"{LORA_PREFIX}{module}::B"
        factors = [(s[a_key], s[b_key], alpha / s[a_key].shape[0]) for s in states]
        for k, ((A, _, scale), (U, S, Vh)) in enumerate(zip(factors, mixed_svds(factors, coefs))):
            out[k][a_key], out[k][b_key] = split_svd(U, S, Vh, A.shape[0], scale, A.dtype)
    a = np.asarray(weights, dtype=np.float64)
    for group in head_groups(states):
        sub = a[np.ix_(group, group)]
        sub = sub / sub.sum(axis=1, keepdims=True)
        for key in states[group[0]]:
            if key.startswith(HEAD_PREFIX):
                for k, head in zip(group, laplacian_step([states[k][key] for k in group], sub, eta)):
                    out[k][key] = head
    return [{key: new[key] for key in state} for state, new in zip(states, out)]
