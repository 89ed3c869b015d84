"""`ffa_lora`: FFA-LoRA (Sun, Li, Li, Ding, ICLR 2024): A stays frozen at its seeded initialisation, which every
client shares (`FederatedLoRAModel.add_client` seeds each from the run seed), and only B and the head train and
travel. Under one common A the mean of the B's is the mean of the updates B·A: the aggregation is exact."""
from __future__ import annotations

from atlasfl.methods.field import PartsMean


class FFALoRA(PartsMean):
    name = "ffa_lora"
    summary = ("FFA-LoRA: A frozen at its common seeded start; B and the head trained and averaged (shard-weighted) "
               "at the preset's median rank.")
    trains = uploads = downloads = ("lora_B", "head")

    svd_refusal = ("averages B under a frozen common A, which is already exact, and an SVD would replace the "
                   "frozen A")
