"""`fedrep`: FedRep (Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021) on LoRA: the adapter is the shared representation, averaged (shard-weighted) in
the sharing group, and the head is each client's own, never sent. Each round a client first trains its head with
the adapter frozen, then its adapter with the head frozen (`Method.local_phases`).

Defaults: the Flower baseline (`baselines/fedrep`: `num-local-epochs` 5 head epochs, then `num-rep-epochs` 1
representation epoch); the official code counts the representation epoch inside `--local_ep` (head epochs =
local_ep − local_rep_ep). Its SGD with momentum is ATLAS's AdamW at the preset's learning rate, as for every method.
"""
from __future__ import annotations

from atlasfl.methods.field import PartsMean
from atlasfl.settings import setting

ADAPTER = ("lora_A", "lora_B")
DEFAULT_EPOCHS = (5, 1)  # (head, adapter)


class FedRep(PartsMean):
    name = "fedrep"
    summary = ("FedRep: each round the head alone (adapter frozen), then the adapter alone (head frozen); adapters "
               "averaged (shard-weighted) at the preset's median rank, heads kept local.")
    uploads = downloads = ADAPTER
    settings = {
        **PartsMean.settings,
        "fedrep_head_epochs": (int, setting(
            "fedrep: epochs of the head alone (adapter frozen) at the start of each round; default 5, the Flower "
            "baseline's num-local-epochs. fedrep's epochs are these two, not --local-epochs.", DEFAULT_EPOCHS[0],
            ge=0)),
        "fedrep_body_epochs": (int, setting(
            "fedrep: epochs of the adapter alone (head frozen) after the head's; default 1, the Flower baseline's "
            "num-rep-epochs (the official code's local_rep_ep).", DEFAULT_EPOCHS[1], ge=0)),
    }

    svd_refusal = "averages the adapters' factors and keeps every head local, as its paper averages the body"

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.fedrep_head_epochs + cfg.fedrep_body_epochs == 0:
            raise ValueError("fedrep trains nothing at --fedrep-head-epochs 0 and --fedrep-body-epochs 0: give "
                             "either at least one epoch")

    @classmethod
    def name_suffix(cls, cfg):
        epochs = (cfg.fedrep_head_epochs, cfg.fedrep_body_epochs)
        return super().name_suffix(cfg) + (f"_h{epochs[0]}b{epochs[1]}" if epochs != DEFAULT_EPOCHS else "")

    @classmethod
    def variant(cls, config):
        epochs = tuple(config.get(f"fedrep_{p}_epochs", d) for p, d in zip(("head", "body"), DEFAULT_EPOCHS))
        parts = [super().variant(config), f"τ_h {epochs[0]}, τ_b {epochs[1]}" if epochs != DEFAULT_EPOCHS else None]
        return ", ".join(p for p in parts if p) or None

    def local_phases(self):
        return (("head",), self.cfg.fedrep_head_epochs), (ADAPTER, self.cfg.fedrep_body_epochs)

