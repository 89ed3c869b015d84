"""`hetlora` (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP
2024): per-device ranks; the server zero-pads every client's factors to the group's largest rank, averages A and B
separately weighted by each client's ‖B_k A_k‖_F (sparsity weights, `phases.aggregation.sparsity_weighted_zero_pad`)
and truncates back to each client's ranks; the client adds the rank self-pruning regulariser
λ·Σ_m ‖B_m[:, k_m:] A_m[k_m:, :]‖_F with k_m = ⌊γ·r_m⌋ to its loss, a real gradient on the tail ranks only.

Choices where the paper leaves ATLAS a choice: the weights are per module, from the unscaled product B_k A_k as
the paper writes it (ATLAS's LoRA scale α/r_k is not folded in, nor rescaled as FederatedScope's re-implementation
does). The pruning step itself (drop the tail when its norm shrank) is not run: ranks are fixed by the plan, so
what travels is always r_k(d_in + d_out) per module. Heads: the shard-weighted mean among clients whose heads have
the same shape, as every ATLAS method; the paper is silent (its tasks have no classification head)."""
from __future__ import annotations

import math

from atlasfl.methods.base import Range
from atlasfl.methods.field import FieldMethod
from atlasfl.settings import setting


def lora_pairs(params):
    """The (A, B) factors at the front of a client's trained parameters (`FederatedLoRAModel.trainable_parameters`
    order: per module A (r×d_in) then B (d_out×r), then the head's weight and bias, which never pair up)."""
    pairs, i = [], 0
    while i + 1 < len(params) and params[i].dim() == params[i + 1].dim() == 2 \
            and params[i].shape[0] == params[i + 1].shape[1]:
        pairs.append((params[i], params[i + 1]))
        i += 2
    return pairs


def tail_penalty(pairs, gamma: float):
    """Σ_m ‖B_m[:, k:] A_m[k:, :]‖_F with k = ⌊γ·r_m⌋: the update of each module's ranks past the first ⌊γ·r⌋
    (at γ = 0.99 and r ≤ 100, the last rank; at r = 1 the whole adapter, as the formula gives)."""
    total = 0.0
    for A, B in pairs:
        keep = math.floor(gamma * A.shape[0])
        if keep < A.shape[0]:
            total = total + (B[:, keep:] @ A[keep:]).norm()
    return total


class HetLoRA(FieldMethod):
    name = "hetlora"
    summary = ("Per-device, per-module ranks; zero-padded A and B averaged with sparsity weights ||B_k A_k||, "
               "truncated to each client's ranks; a tail-rank regulariser on the client (Cho et al., 2024).")
    heterogeneous_ranks = True
    default_aggregation = "fedavg"  # zero-padded factors, as `--aggregation fedavg`, with its own weights

    @classmethod
    def dp_refusal(cls, cfg):
        return "weights each client by its own update's norm ||B_k A_k||, which no clipping bound makes private"
    settings = {
        **FieldMethod.settings,
        "hetlora_lambda": (float, setting(
            "hetlora: weight lambda of the rank self-pruning regulariser lambda·Σ_m ||B_m[:,k:] A_m[k:,:]||_F "
            "(0: none).", 0.01, ge=0)),
        "hetlora_gamma": (float, setting(
            "hetlora: decay gamma; the regulariser acts on each module's ranks past floor(gamma·r).", 0.99,
            gt=0, le=1)),
    }
    search_space = {**FieldMethod.search_space, "hetlora_lambda": Range(
        1e-4, 1e-1, log=True, why="a decade around the default 0.01 each way; the regulariser is a Frobenius norm "
                                  "beside a cross-entropy of order 1")}

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation == "svd":
            raise ValueError("hetlora averages zero-padded factors with sparsity weights; --aggregation svd is "
                             "flexlora's rule: drop it, or run flexlora")

    def extra_loss(self):
        lam, gamma = self.cfg.hetlora_lambda, self.cfg.hetlora_gamma
        if lam == 0:
            return None
        return lambda params, start: lam * tail_penalty(lora_pairs(params), gamma)

    def aggregate(self, states, group):
        from atlasfl.phases.aggregation import (
            check_same_keys,
            factor_step,
            head_means,
            lora_modules,
            normalise_weights,
            sparsity_weighted_zero_pad,
        )

        check_same_keys(states)
        out = [{} for _ in states]
        for module in lora_modules(states[0]):
            a, b = f"lora::{module}::A", f"lora::{module}::B"
            new = sparsity_weighted_zero_pad([(s[a], s[b]) for s in states], group.sizes,
                                             factor_step(group.step, module))
            for state, (A, B) in zip(out, new):
                state[a], state[b] = A, B
        head_means(states, normalise_weights(group.sizes, len(states)), out, group.step)
        return [{key: new[key] for key in state} for state, new in zip(states, out)]
