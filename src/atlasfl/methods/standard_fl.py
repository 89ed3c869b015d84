"""`standard_fl`: FedAvg over all clients at one rank (heads of equal shape averaged across tasks, the baseline's
known weakness)."""
from __future__ import annotations

from atlasfl.methods.base import Method


class StandardFL(Method):
    name = "standard_fl"
    summary = "FedAvg of adapters and heads over all clients at the preset's median rank."
    uses_fingerprints = False

    @classmethod
    def clusters_from(cls, config):
        return None

    def groups(self, clients, clusters):
        return [list(clients)]
