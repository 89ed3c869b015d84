"""What each method does with clusters, ranks, aggregation and personalisation (DESIGN.md §2)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    group: str  # 'none' (no aggregation), 'all' (one group), 'cluster' (one group per cluster)
    heterogeneous_ranks: bool  # per-device, per-module ranks; else the preset's median rank everywhere
    personalise: bool  # Laplacian step instead of the cluster mean
    default_aggregation: str  # 'fedavg' for homogeneous ranks, 'svd' for heterogeneous

    @property
    def communicates(self) -> bool:
        return self.group != "none"


METHOD_SPECS: dict[str, MethodSpec] = {
    "local_only": MethodSpec("local_only", "none", True, False, "svd"),
    "standard_fl": MethodSpec("standard_fl", "all", False, False, "fedavg"),
    "fedavg_cluster": MethodSpec("fedavg_cluster", "cluster", False, False, "fedavg"),
    "atlas_no_laplacian": MethodSpec("atlas_no_laplacian", "cluster", True, False, "svd"),
    "atlas": MethodSpec("atlas", "cluster", True, True, "svd"),
}
