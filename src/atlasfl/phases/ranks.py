"""Per-module LoRA rank allocation within one client's budget (docs/design.md §3.2, AdaLoRA-style).

The budget (a total rank) is shared in proportion to layer importance and rounded to the preset's
candidates. Allocation is a fixed priority order of single-step upgrades (each module from one
candidate to the next), applied while they fit: an upgrade's priority is the budget at which the
module's proportional share would round up to it, so with enough budget every module gets its
nearest candidate, the least important ones lose upgrades first when rounding overshoots, and
leftover budget goes on to the next upgrades in that order. Because every budget takes a prefix
of one sequence, more budget never gives any module a smaller rank.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from atlasfl.phases.devices import TRAINABLE_BYTES_PER_PARAM


def usable_candidates(candidates: Sequence[int], cap: int) -> list[int]:
    """Sorted candidates not above the cap; the smallest candidate when none is."""
    if not candidates or min(candidates) < 1:
        raise ValueError(f"rank candidates must be positive integers, got {list(candidates)}")
    usable = sorted({c for c in candidates if c <= cap})
    return usable or [min(candidates)]


def allocate_ranks(
    modules: Sequence[str],
    importance: Mapping[str, float | None],
    *,
    cap: int,
    candidates: Sequence[int],
    total_budget: int | None = None,
) -> dict[str, int]:
    """Rank per module, each a candidate ≤ cap, summing to at most the budget (cap × modules by default).

    `cap` bounds every single module. The server calls it with cap = the largest candidate and
    total_budget = the device's `mean_rank_cap` × modules: the device caps the mean rank, and
    importance decides which modules get more than that mean and which less.

    Missing or None importances count as 0; all zero means uniform. Every module gets at least the
    smallest candidate, even if that alone exceeds the budget.
    """
    if not modules:
        return {}
    cands = usable_candidates(candidates, cap)
    budget = cap * len(modules) if total_budget is None else total_budget
    imp = {m: float(importance.get(m) or 0.0) for m in modules}
    if any(v < 0 or not math.isfinite(v) for v in imp.values()):
        raise ValueError("importances must be finite and non-negative")
    total_imp = sum(imp.values())
    share = {m: (imp[m] / total_imp if total_imp > 0 else 1.0 / len(modules)) for m in modules}

    upgrades = []  # (budget at which the share rounds up to this step, tie-breaks, module, new rank)
    for order, m in enumerate(modules):
        for lower, upper in zip(cands, cands[1:]):
            threshold = (lower + upper) / 2 / share[m] if share[m] > 0 else math.inf
            upgrades.append((threshold, -imp[m], order, m, upper))
    upgrades.sort()

    ranks = {m: cands[0] for m in modules}
    used = cands[0] * len(modules)
    for _, _, _, m, upper in upgrades:
        cost = upper - ranks[m]
        if used + cost > budget:
            break
        ranks[m] = upper
        used += cost
    return ranks


def adapter_params(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    """Trainable LoRA parameters: Σ r·(d_out + d_in) over modules with shapes (d_out, d_in)."""
    missing = [m for m in ranks if m not in shapes]
    if missing:
        raise ValueError(f"no shape given for module(s) {', '.join(missing)}")
    return sum(r * (shapes[m][0] + shapes[m][1]) for m, r in ranks.items())


def rank_budget_for_memory(free_bytes: int, shapes: Mapping[str, tuple[int, int]]) -> int:
    """Largest total rank whose adapters (fp32 weights, grads, AdamW states) surely fit `free_bytes`.

    Priced at the widest module, so it holds however the total is spread over modules.
    """
    if not shapes or free_bytes <= 0:
        return 0
    widest = max(d_out + d_in for d_out, d_in in shapes.values())
    return int(free_bytes // (widest * TRAINABLE_BYTES_PER_PARAM))
