"""What the field's methods share: they run over all clients, as their papers do, or inside the discovered
clusters (`--sharing cluster`), so what clustering brings and what the aggregation rule brings can be told
apart (e.g. `hetlora --sharing cluster` against `atlas_no_laplacian`)."""
from __future__ import annotations

from typing import ClassVar, Literal

from atlasfl.methods.base import Method
from atlasfl.settings import setting


class FieldMethod(Method):
    """A published method: its group is every client unless `--sharing cluster`."""

    settings = {"sharing": (Literal["all", "cluster"], setting(
        "The field's methods (not local_only, standard_fl, fedavg_cluster or atlas*): all: one group of every "
        "client, as their papers; cluster: one group per discovered cluster.", "all"))}

    @classmethod
    def name_suffix(cls, cfg):
        return "_cluster" if cfg.sharing == "cluster" else ""  # an `all` and a `cluster` run never share a file

    @classmethod
    def variant(cls, config):
        return "in clusters" if config.get("sharing") == "cluster" else None

    @classmethod
    def clusters_from(cls, config):
        return "phase 1" if config.get("sharing") == "cluster" else None

    @property
    def uses_fingerprints(self) -> bool:
        """Phase 1's upload is traffic where it serves: clusters to share in, or importances to spread ranks by."""
        return self.cfg.sharing == "cluster" or self.heterogeneous_ranks

    def groups(self, clients, clusters):
        return super().groups(clients, clusters) if self.cfg.sharing == "cluster" else [list(clients)]


class PartsMean(FieldMethod):
    """A field method that sends only some parts of the state (`uploads`): the server's rule is the shard-weighted
    mean of what arrives, and an SVD refactoring cannot apply (`svd_refusal` says why)."""

    svd_refusal: ClassVar[str]

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation == "svd":
            raise ValueError(f"{cls.name} {cls.svd_refusal}, so --aggregation svd cannot apply; drop it")

    def aggregate(self, states, group):
        from atlasfl.phases.aggregation import mean_of_parts, robust_rule

        return mean_of_parts(states, group.sizes, group.step,
                             robust_rule(group.cfg.robust_aggregation, group.cfg.trim_fraction))
