"""`fedprox`: FedAvg with a proximal term on every client (Li et al., MLSys 2020)."""
from __future__ import annotations

from atlasfl.methods.base import Range
from atlasfl.methods.field import FieldMethod
from atlasfl.settings import setting

DEFAULT_MU = 0.01  # OpenFedLLM's prox_mu and pfl-research's benchmark mu


class FedProx(FieldMethod):
    name = "fedprox"
    summary = ("FedAvg at the preset's median rank, each client's loss plus (mu/2)·||θ − θ_start||² over its "
               "trained state (θ_start: the round's start).")
    settings = {**FieldMethod.settings, "prox_mu": (float, setting(
        "fedprox: weight mu of the proximal term (mu/2)·||θ − θ_start||² (squared norm) added to each client's "
        "loss; 0 is plain FedAvg.", DEFAULT_MU, ge=0))}
    search_space = {**FieldMethod.search_space, "prox_mu": Range(
        1e-3, 1.0, log=True, why="the FedProx paper's grid {0.001, 0.01, 0.1, 1}, OpenFedLLM's 0.01 inside")}

    @classmethod
    def name_suffix(cls, cfg):
        return super().name_suffix(cfg) + (f"_mu{cfg.prox_mu:g}" if cfg.prox_mu != DEFAULT_MU else "")

    @classmethod
    def variant(cls, config):
        parts = [super().variant(config),
                 f"mu{config['prox_mu']:g}" if config.get("prox_mu", DEFAULT_MU) != DEFAULT_MU else None]
        return ", ".join(p for p in parts if p) or None

    def extra_loss(self):
        """None at mu = 0: no term at all, so the run is FedAvg's bit for bit (a zero term still changes sums)."""
        mu = self.cfg.prox_mu
        if mu == 0:
            return None
        return lambda params, start: proximal_term(params, start, mu)


def proximal_term(params, start, mu: float):
    """(mu/2)·Σ_i ‖p_i − s_i‖², the squared Euclidean distance of the trained tensors from their start."""
    return mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
