"""`fedsa_lora`: FedSA-LoRA (Guo et al., ICLR 2025): every client trains A, B and its head; only A, which learns
what the clients share, is averaged, while B and the head stay each client's own (the official GLUE config
keeps the classifier local too), so each client ends with its own B_k·A."""
from __future__ import annotations

from atlasfl.methods.field import PartsMean


class FedSALoRA(PartsMean):
    name = "fedsa_lora"
    summary = ("FedSA-LoRA: A averaged (shard-weighted) at the preset's median rank; B and the head trained and "
               "kept local.")
    uploads = downloads = ("lora_A",)

    svd_refusal = "averages A alone and keeps B local: there is no B·A to refactor"
