"""`atlas_no_laplacian`: per-device, per-module ranks; rank-heterogeneous aggregation inside each cluster."""
from __future__ import annotations

from atlasfl.methods.base import Method


class AtlasNoLaplacian(Method):
    name = "atlas_no_laplacian"
    summary = ("Per-device, per-module ranks; the cluster's weighted mean update, refactored at each client's ranks "
               "(SVD).")
    heterogeneous_ranks = True
    default_aggregation = "svd"
