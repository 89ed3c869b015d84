"""`local_only`: every client trains alone; phases 1-2 run as for `atlas` (same ranks), nothing is sent."""
from __future__ import annotations

from atlasfl.methods.base import Method


class LocalOnly(Method):
    name = "local_only"
    summary = "Each client trains alone at its device's ranks; nothing is sent (fingerprints for the report only)."
    heterogeneous_ranks = True
    default_aggregation = "svd"
    uses_fingerprints = False
    group_average = False  # nothing is shared

    @classmethod
    def dp_refusal(cls, cfg):
        return "shares nothing: no update leaves a client, so there is nothing to make private"

    @classmethod
    def clusters_from(cls, config):
        return None

    def groups(self, clients, clusters):
        return []
