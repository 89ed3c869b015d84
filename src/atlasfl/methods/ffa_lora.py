"""`ffa_lora`: FFA-LoRA (Sun, Li, Li, Ding, ICLR 2024): A stays frozen at its seeded initialisation, which every
client shares (`FederatedLoRAModel.add_client` seeds each from the run seed), and only B and the head train and
travel. Under one common A the mean of the B's is the mean of the updates B·A: the aggregation is exact."""
from __future__ import annotations

from atlasfl.methods.field import FieldMethod


class FFALoRA(FieldMethod):
    name = "ffa_lora"
    summary = ("FFA-LoRA: A frozen at its common seeded start; B and the head trained and averaged (shard-weighted) "
               "at the preset's median rank.")
    trains = uploads = downloads = ("lora_B", "head")

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation == "svd":
            raise ValueError(f"{cls.name} averages B under a frozen common A, which is already exact; an SVD would "
                             "replace the frozen A, so --aggregation svd cannot apply: drop it")

    def aggregate(self, states, group):
        from atlasfl.phases.aggregation import mean_of_parts

        return mean_of_parts(states, group.sizes)
