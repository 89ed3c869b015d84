"""`flora` (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): per-device ranks; the server stacks the group's factors along the rank,
A_glob = [p_1 s_1 A_1; …] and B_glob = [B_1 …] (`phases.stacking`), so B_glob A_glob = Σ_k p_k ΔW_k exactly, and
sends the stacked pair (rank Σ_j r_j) to every member. Each client merges it into its own frozen dense residual
(ATLAS's stand-in for the paper's `merge_and_unload` into the base weights, which one shared backbone cannot
do per client) and restarts from a fresh LoRA at its own ranks.

Choices where the paper leaves ATLAS one: each client's scale s_k = α/r_k is folded into its block of A (the
paper's code keeps α/r = 2 for every rank), so the merge needs no scale of its own. The fresh LoRA is PEFT's
initialisation drawn from a seed of (run, round, client), a new draw each round and for each client, as the
paper's code builds a new LoraConfig per client each round. Heads: the shard-weighted mean among clients whose
heads have the same shape, as every ATLAS method (the paper's tasks have no classification head); they are
merged as they are, not stacked. What travels: up r_k(d_in + d_out) per module and the head, down
Σ_j r_j (d_in + d_out) per module (the group's replying members' ranks) and the head."""
from __future__ import annotations

from atlasfl.methods.base import select
from atlasfl.methods.field import FieldMethod


class FLoRA(FieldMethod):
    name = "flora"
    summary = ("Per-device, per-module ranks; the group's factors stacked (exact mean update, rank Σ r_k) and sent "
               "down, merged into each client's frozen residual, every client restarting from a fresh LoRA "
               "(Wang et al., 2024).")
    heterogeneous_ranks = True
    keeps_residual = True
    # The stacked factors are sent, not a dense average: a server optimiser's step would need the dense ΔW sent.
    group_average = False
    catch_up = "each"  # every stacked update it missed is merged into its residual, in order (the global model)

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation is not None:
            raise ValueError(f"flora stacks the factors, which is already exact, so --aggregation "
                             f"{cfg.aggregation} cannot apply; drop it")

    def aggregate(self, states, group):
        from atlasfl.phases.aggregation import aggregate_states, lora_modules
        from atlasfl.phases.stacking import stack_factors

        heads = aggregate_states([select(s, ("head",)) for s in states], group.sizes, alpha=group.cfg.lora_alpha,
                                 mode="fedavg")
        stacked = {}
        for module in lora_modules(states[0]):
            a, b = f"lora::{module}::A", f"lora::{module}::B"
            stacked[a], stacked[b] = stack_factors(
                [(s[a], s[b], group.cfg.lora_alpha / s[a].shape[0]) for s in states], group.sizes)
        return [{**stacked, **head} for head in heads]

    def receive(self, received, residual, *, ranks, cid, round_idx):
        """The client's new state: its residual plus B_glob A_glob, a fresh LoRA, the received head."""
        import torch

        from atlasfl.federation.training import client_seed
        from atlasfl.phases.stacking import fresh_lora, merge_stacked

        out = select(received, ("head",))
        draws = torch.Generator().manual_seed(client_seed(self.cfg.seed, round_idx, cid))  # modules in plan order
        for module, rank in ranks.items():
            A, B = received[f"lora::{module}::A"], received[f"lora::{module}::B"]
            key = f"lora::{module}::R"
            old = residual.get(key)  # absent: the zero residual of a client's start (the Flower server's copy)
            out[key] = merge_stacked(A.new_zeros(B.shape[0], A.shape[1]) if old is None else old.cpu(), A, B)
            out[f"lora::{module}::A"], out[f"lora::{module}::B"] = fresh_lora(rank, A.shape[1], B.shape[0], draws)
        return out
