"""CFL's server rule (Sattler, Müller, Samek, "Clustered Federated Learning: Model-Agnostic Distributed Multitask
Optimization Under Privacy Constraints", IEEE TNNLS, arXiv 1910.01991), as pure functions over the clients' updates
ΔW_i (what a client's round moved its trainable tensors by, flattened into one vector).

A cluster is split when FedAvg inside it is near a stationary point of the joint objective while some client is
still far from its own: ‖mean_i ΔW_i‖ < ε₁ and max_i ‖ΔW_i‖ > ε₂ (the plain mean, as the official code's
`compute_mean_update_norm`). The split is the bipartition of complete-linkage clustering on the pairwise cosine
similarities of the members' updates, so the two parts are the two sets whose updates point apart the most."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def flat_update(upload: dict[str, torch.Tensor], start: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """ΔW: the `keys` of `upload` less their values in `start`, concatenated into one float64 vector."""
    return torch.cat([(upload[k].double() - start[k].double()).flatten() for k in keys])


def update_norms(updates: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(‖mean_i ΔW_i‖, max_i ‖ΔW_i‖): the near-stationarity of the cluster's mean and the largest client update."""
    stacked = torch.stack(list(updates))
    return float(stacked.mean(dim=0).norm()), float(stacked.norm(dim=1).max())


def splits(mean_norm: float, max_norm: float, *, size: int, round_idx: int, eps1: float, eps2: float,
           warmup: int) -> bool:
    """The split condition: mean update below ε₁, some client's above ε₂, more than two members, past the warm-up."""
    return mean_norm < eps1 and max_norm > eps2 and size > 2 and round_idx > warmup


def cosine_similarities(updates: Sequence[torch.Tensor]) -> np.ndarray:
    """The members' pairwise cosine similarities α_ij = <ΔW_i, ΔW_j> / (‖ΔW_i‖ ‖ΔW_j‖) (0 for a zero update)."""
    stacked = torch.stack(list(updates))
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).numpy()


def bipartition(similarity: np.ndarray) -> tuple[list[int], list[int]]:
    """Two parts (member indices, ascending; the part holding member 0 first) from complete linkage on the
    distances 1 − α_ij (linkage is unchanged by the shift the official code leaves out, −α_ij)."""
    distance = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform((distance + distance.T) / 2, checks=False), method="complete"), 2,
                      criterion="maxclust")
    first = [i for i, label in enumerate(labels) if label == labels[0]]
    return first, [i for i in range(len(labels)) if labels[i] != labels[0]]
