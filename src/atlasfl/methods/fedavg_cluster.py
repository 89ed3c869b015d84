"""`fedavg_cluster`: FedAvg inside each fingerprint cluster at one rank."""
from __future__ import annotations

from atlasfl.methods.base import Method


class FedAvgCluster(Method):
    name = "fedavg_cluster"
    summary = "FedAvg of adapters and heads inside each discovered cluster at the preset's median rank."
