"""Clients that keep a personal copy of their adapter and head beside the shared one (Ditto's personal model).

The copy is a client of the same model under an id of its own (`personal_id`, never a shard's), so training,
client batching and prediction need nothing new; its tensors are the `personal::` keys of its client's state, so
checkpoints, resume, the Flower server's copies and the state digests carry it like any other part, while what
travels is chosen by part and never includes it (`methods.base.part_of`).
"""
from __future__ import annotations

import torch

from atlasfl.models.lora import FederatedLoRAModel

PERSONAL = "personal::"  # the prefix of a personal copy's keys in its client's state


def personal_id(cid: int) -> int:
    """The model's id of client `cid`'s personal copy."""
    return -1 - cid


class PersonalLoRAModel(FederatedLoRAModel):
    """A `FederatedLoRAModel` whose clients may keep a personal copy (`add_client(..., personal=True)`); a client
    without one is exactly a `FederatedLoRAModel` client."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.personal: set[int] = set()

    def add_client(self, cid: int, ranks: dict[str, int], num_labels: int, *, personal: bool = False,
                   residual: bool = False) -> None:
        """The copy starts from the run seed as the client itself does: v⁰ = w⁰."""
        if personal:
            super().add_client(personal_id(cid), ranks, num_labels)
            self.personal.add(cid)
        super().add_client(cid, ranks, num_labels, residual=residual)

    def model_of(self, cid: int) -> int:
        """The id whose adapter and head client `cid` predicts with: its personal copy where it keeps one."""
        return personal_id(cid) if cid in self.personal else cid

    def get_state(self, cid: int) -> dict[str, torch.Tensor]:
        state = super().get_state(cid)
        if cid in self.personal:
            state.update({PERSONAL + key: value for key, value in super().get_state(personal_id(cid)).items()})
        return state

    def set_state(self, cid: int, state: dict[str, torch.Tensor], *, partial: bool = False) -> None:
        own = {key: value for key, value in state.items() if not key.startswith(PERSONAL)}
        if cid in self.personal:
            copy = {key[len(PERSONAL):]: value for key, value in state.items() if key.startswith(PERSONAL)}
            if copy or not partial:
                super().set_state(personal_id(cid), copy, partial=partial)
        elif len(own) != len(state):
            raise ValueError(f"client {cid} keeps no personal copy, but its state names one")
        super().set_state(cid, own, partial=partial)
