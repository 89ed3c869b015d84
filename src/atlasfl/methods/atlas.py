"""`atlas`: per-device ranks inside discovered clusters, each client personalised by a graph-Laplacian step on
its own locally trained update (docs/design.md §3.4); with `--lambda-sweep` one federation per step size η of a
grid, η chosen on local validation."""
from __future__ import annotations

from typing import Literal

from atlasfl.methods.base import Method, Range
from atlasfl.settings import setting

DEFAULT_ETA = 0.1
LAMBDA_GRID = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


class Atlas(Method):
    name = "atlas"
    summary = ("Per-device, per-module ranks; inside each discovered cluster every client takes a Laplacian step "
               "of size eta towards its neighbours' updates, refactored at its own ranks.")
    heterogeneous_ranks = True
    default_aggregation = "svd"
    personalises = True
    group_average = False  # each client takes its own Laplacian step: there is no one average to step
    catch_up = "none"  # its state is its own step towards the neighbours that took part; an absent one keeps it
    settings = {
        "eta": (float, setting("Laplacian step size of atlas, in [0, 1].", DEFAULT_ETA, ge=0, le=1)),
        "lambda_sweep": (bool, setting("atlas: run the eta grid and pick eta on local validation.", False)),
        "lambda_grid": (tuple[float, ...], setting("The etas of --lambda-sweep.", LAMBDA_GRID)),
        "eta_selection": (Literal["shared", "per_client"], setting(
            "--lambda-sweep: which choice of eta is final_metrics: shared (one eta, best mean local-validation "
            "score) or per_client (each client's eta with its best own local-validation score); both are "
            "recorded.", "shared")),
    }
    search_space = {**Method.search_space, "eta": Range(
        0.0, 1.0, why="the whole step: 0 is local_only, 1 a full step to the neighbours' updates")}

    def etas(self):
        return self.cfg.lambda_grid if self.cfg.lambda_sweep else (self.cfg.eta,)

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation == "fedavg":
            raise ValueError(f"{cls.name}'s Laplacian step always refactors by SVD, so --aggregation fedavg would be "
                             "ignored; drop it, or use atlas_no_laplacian to compare the two aggregations")

    @classmethod
    def name_suffix(cls, cfg):
        if cfg.lambda_sweep:
            return "_lsweep"
        return f"_eta{cfg.eta:g}" if cfg.eta != DEFAULT_ETA else ""

    @classmethod
    def variant(cls, config):
        if config.get("lambda_sweep"):
            return "sweep"
        return f"{config['eta']:g}" if "eta" in config else None

    def shares(self, eta):
        return eta > 0  # η = 0 is the identity: every client keeps its own update, exactly `local_only`

    def aggregate(self, states, group):
        from atlasfl.phases.laplacian import affinity, personalise_states

        return personalise_states(states, affinity(group.fingerprints), group.eta, alpha=group.cfg.lora_alpha)
