"""Server logic of one federation, independent of transport.

The in-process loop and the Flower ServerApp both hand it the clients' uploaded states and send
back what it returns; it never touches a model, a socket or a file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlasfl.federation.methods import MethodSpec
from atlasfl.phases.aggregation import aggregate_states
from atlasfl.phases.laplacian import affinity, personalise_states

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientInfo:
    cid: int
    task: str
    num_train: int


class Server:
    def __init__(self, method: MethodSpec, clients: list[ClientInfo], *, alpha: float, aggregation: str,
                 eta: float = 0.0):
        self.method = method
        self.clients = {c.cid: c for c in clients}
        self.alpha = alpha
        self.aggregation = aggregation
        self.eta = eta
        self.cluster_labels: list[int] = [0] * len(clients)
        self.fingerprints: np.ndarray | None = None

    def set_clusters(self, labels: list[int], fingerprints: np.ndarray | None = None) -> None:
        self.cluster_labels = list(labels)
        self.fingerprints = fingerprints

    def groups(self) -> list[list[int]]:
        """Client ids aggregated together, by the method's grouping."""
        cids = sorted(self.clients)
        if self.method.group == "none":
            return []
        if self.method.group == "all":
            return [cids]
        by_label: dict[int, list[int]] = {}
        for cid in cids:
            by_label.setdefault(self.cluster_labels[cid], []).append(cid)
        return list(by_label.values())

    def aggregate(self, uploads: dict[int, State]) -> dict[int, State]:
        """New trainable state for every client of every group, at each client's own shapes."""
        out: dict[int, State] = {}
        for group in self.groups():
            states = [uploads[c] for c in group]
            weights = [self.clients[c].num_train for c in group]
            if self.method.personalise:
                a = affinity(self.fingerprints[group]) if self.fingerprints is not None else np.full(
                    (len(group), len(group)), 1.0 / len(group))
                new = personalise_states(states, a, self.eta, alpha=self.alpha)
            else:
                new = aggregate_states(states, weights, alpha=self.alpha, mode=self.aggregation)
            out.update(zip(group, new))
        return out
