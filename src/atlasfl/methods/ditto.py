"""`ditto`: Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021) on LoRA. The global adapter and head are FedAvg's: trained, sent and averaged exactly as `standard_fl`
(over all clients; `--sharing cluster`: each cluster), and nothing else travels. Each client also keeps a personal
adapter and head (`models.personal`), trained after the global one on the same batches with the loss plus
(λ/2)·‖v − w‖², w the global state the round started from (gradient λ(v − w), as the paper's Algorithm 1 and
`litian96/ditto`); the personal copy is what the client is evaluated with, on both protocols.

λ defaults to 0.1, FederatedScope's `personalization.regular_weight` (the official code takes `--lam`, or picks
it from {0.1, 1, 2} by validation loss with `dynamic_lam`). The paper's SGD is ATLAS's AdamW for both models.
"""
from __future__ import annotations

from atlasfl.methods.base import Range
from atlasfl.methods.fedprox import proximal_term
from atlasfl.methods.field import FieldMethod
from atlasfl.settings import setting

DEFAULT_LAMBDA = 0.1


class Ditto(FieldMethod):
    name = "ditto"
    summary = ("Ditto: FedAvg of a global adapter and head at the preset's median rank, plus a personal copy per "
               "client trained on the same batches with (λ/2)·||v − w||² toward the global; scored with the copy.")
    keeps_personal = True
    settings = {**FieldMethod.settings, "ditto_lambda": (float, setting(
        "ditto: weight λ of the pull (λ/2)·||v − w||² of each client's personal adapter and head v toward the "
        "global state w it started the round from; 0: the personal copy trains as local_only would. Default 0.1, "
        "FederatedScope's regular_weight.", DEFAULT_LAMBDA, ge=0))}
    search_space = {**FieldMethod.search_space, "ditto_lambda": Range(1e-2, 2.0, log=True)}

    @classmethod
    def name_suffix(cls, cfg):
        lam = cfg.ditto_lambda
        return super().name_suffix(cfg) + (f"_lam{lam:g}" if lam != DEFAULT_LAMBDA else "")

    @classmethod
    def variant(cls, config):
        lam = config.get("ditto_lambda", DEFAULT_LAMBDA)
        parts = [super().variant(config), f"λ{lam:g}" if lam != DEFAULT_LAMBDA else None]
        return ", ".join(p for p in parts if p) or None

    def personal_loss(self):
        """None at λ = 0: no term at all, so the copy trains bit for bit as a client training alone."""
        lam = self.cfg.ditto_lambda
        if lam == 0:
            return None
        return lambda params, anchor: proximal_term(params, anchor, lam)
