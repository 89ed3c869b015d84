"""FLoRA's stacking (Wang et al., NeurIPS 2024) for one adapted module, and what a client does with it.

Client k's update is ΔW_k = s_k·B_k A_k with its own LoRA scale s_k = α/r_k. Stacking along the rank,
A_glob = [p_1 s_1 A_1; …; p_K s_K A_K] and B_glob = [B_1 … B_K], gives B_glob A_glob = Σ_k p_k ΔW_k exactly:
the paper folds p_k into A; ATLAS folds s_k in as well, since its clients' scales differ (the paper's code
keeps s = 2 for every rank). The stacked pair is merged into the client's frozen dense residual and the client
restarts from a fresh LoRA. Shapes follow nn.Linear: A is r×d_in, B is d_out×r, ΔW and the residual d_out×d_in
(GPT-2's Conv1D transposes its own weight, never these).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from atlasfl.phases.aggregation import normalise_weights

Tensor = torch.Tensor


def stack_factors(factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]
                  ) -> tuple[Tensor, Tensor]:
    """(A_glob, B_glob) of rank Σ r_k from each client's (A_k, B_k, s_k) and weights p_k (normalised here); a client
    of weight zero adds nothing to the sum, so none of its rank is stacked."""
    p = normalise_weights(weights, len(factors))
    kept = [(p_k, f) for p_k, f in zip(p, factors) if p_k > 0]
    A = torch.cat([A_k * (p_k * s_k) for p_k, (A_k, _, s_k) in kept], dim=0)
    B = torch.cat([B_k for _, (_, B_k, _) in kept], dim=1)
    return A, B


def merge_stacked(residual: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """residual + B@A, the product in float64, returned in the residual's dtype."""
    return (residual.to(torch.float64) + B.to(torch.float64) @ A.to(torch.float64)).to(residual.dtype)


def fresh_lora(rank: int, d_in: int, d_out: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A new LoRA pair as PEFT initialises one (A: Kaiming-uniform with a = √5, i.e. U(±1/√d_in); B = 0), drawn
    from `generator` (a seeded one of its own: the global RNG stays untouched, any process draws alike)."""
    A = torch.empty(rank, d_in)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A, torch.zeros(d_out, rank)
