"""Rank-heterogeneous aggregation of LoRA adapters and heads (docs/design.md §3.3).

A trainable state is a flat dict: ``lora::<module>::A`` (r×d_in), ``lora::<module>::B``
(d_out×r) and ``head::<param>``. A module's update is ΔW = (alpha/r)·B@A.

``svd`` averages the ΔW themselves (the quantity that acts on the model) and gives each client
the Eckart–Young best approximation at its own rank. ``fedavg`` averages A and B separately with
zero padding (FedIT/HetLoRA), kept as the classic baseline; with equal ranks it is plain FedAvg.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from atlasfl.errors import AtlasError
from atlasfl.phases import AGGREGATIONS

Tensor = torch.Tensor
# A server optimiser's step on one tensor of a group's aggregate (`phases.server_optimizer`): (key, aggregate) ->
# what the members receive. None: the aggregate as it is.
Step = Callable[[str, Tensor], Tensor] | None
LORA_PREFIX = "lora::"
HEAD_PREFIX = "head::"


def normalise_weights(weights: Sequence[float] | np.ndarray, n: int) -> list[float]:
    """Non-negative weights, one per client, scaled to sum 1."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n or n == 0:
        raise ValueError(f"expected {n} weights, got {w.size}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return (w / total).tolist()


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float] | np.ndarray) -> Tensor:
    """Σ w_k·t_k with normalised weights, accumulated in float64 and returned in the input dtype."""
    w = normalise_weights(weights, len(tensors))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot average tensors of different shapes {sorted(shapes)}")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for wk, t in zip(w, tensors):
        acc += wk * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The weight update a LoRA module applies: scale·B@A (d_out×d_in)."""
    return scale * (B @ A)


def split_svd(
    U: Tensor, S: Tensor, Vh: Tensor, rank: int, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Balanced factors of the rank-`rank` truncation: B = U_r√(S_r/scale), A = √(S_r/scale)V_rᵀ.

    Zero rows/columns pad the factors when fewer than `rank` singular values exist.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if scale <= 0:
        raise ValueError(f"LoRA scale must be positive, got {scale}")
    k = min(rank, S.numel())
    root = torch.sqrt(S[:k].clamp_min(0) / scale)
    B = torch.zeros(U.shape[0], rank, dtype=U.dtype, device=U.device)
    A = torch.zeros(rank, Vh.shape[1], dtype=Vh.dtype, device=Vh.device)
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return A.to(dtype), B.to(dtype)


def refactor(delta: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A, B) with scale·B@A the best rank-`rank` approximation of `delta` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return split_svd(U, S, Vh, rank, scale, delta.dtype)


def mixed_svds(
    factors: Sequence[tuple[Tensor, Tensor, float]], coefs: np.ndarray | Sequence[Sequence[float]]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Thin SVD of Σ_l C_ml·scale_l·B_l@A_l for every row m of C, never forming a d_out×d_in matrix.

    The sums are B_cat·diag(c_m)·A_cat with factors stacked along the rank; one QR of each side
    reduces every SVD to an (Σr_l)-sized problem, which keeps large layers cheap.
    """
    C = np.asarray(coefs, dtype=np.float64)
    if C.ndim != 2 or C.shape[1] != len(factors):
        raise ValueError(f"need a coefficient matrix with {len(factors)} columns, got shape {C.shape}")
    B_cat = torch.cat([s * B.to(torch.float64) for _, B, s in factors], dim=1)
    A_cat = torch.cat([A.to(torch.float64) for A, _, _ in factors], dim=0)
    Qb, Rb = torch.linalg.qr(B_cat)
    Qa, Ra = torch.linalg.qr(A_cat.T)
    ranks = torch.tensor([A.shape[0] for A, _, _ in factors], device=Rb.device)
    result = []
    for row in C:
        column_coefs = torch.repeat_interleave(torch.as_tensor(row, device=Rb.device), ranks)
        Um, S, Vhm = torch.linalg.svd((Rb * column_coefs) @ Ra.T, full_matrices=False)
        result.append((Qb @ Um, S, Vhm @ Qa.T))
    return result


def svd_aggregate(
    factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float] | np.ndarray,
    step: Callable[[Tensor], Tensor] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Each client's rank-r_k best approximation of the weighted mean ΔW; factors are (A, B, scale). With a
    server `step`, the dense mean ΔW (float64) is formed, stepped, and the step's result is refactored."""
    w = normalise_weights(weights, len(factors))
    if step is None:
        U, S, Vh = mixed_svds(factors, [w])[0]
    else:
        mean = sum(wk * lora_delta(A.to(torch.float64), B.to(torch.float64), s) for wk, (A, B, s) in zip(w, factors))
        U, S, Vh = torch.linalg.svd(step(mean), full_matrices=False)
    return [split_svd(U, S, Vh, A.shape[0], scale, A.dtype) for A, _, scale in factors]


def zero_pad_fedavg(
    factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float] | np.ndarray,
    step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Average A and B separately after zero-padding to the largest rank; client k keeps its first r_k (of the
    server `step`'s result on the padded means, where there is one)."""
    r_max = max(A.shape[0] for A, _ in factors)
    padded_A = [torch.cat([A, A.new_zeros(r_max - A.shape[0], A.shape[1])], dim=0) for A, _ in factors]
    padded_B = [torch.cat([B, B.new_zeros(B.shape[0], r_max - B.shape[1])], dim=1) for _, B in factors]
    mean_A = weighted_mean(padded_A, weights)
    mean_B = weighted_mean(padded_B, weights)
    if step is not None:
        mean_A, mean_B = step(mean_A, mean_B)
    return [(mean_A[: A.shape[0]].clone(), mean_B[:, : A.shape[0]].clone()) for A, _ in factors]


def parse_key(key: str) -> tuple[str, str, str]:
    """Split a state key into (kind, name, part): ('lora', module, 'A'|'B') or ('head', param, '')."""
    if key.startswith(HEAD_PREFIX):
        return "head", key[len(HEAD_PREFIX):], ""
    if key.startswith(LORA_PREFIX):
        module, sep, part = key[len(LORA_PREFIX):].rpartition("::")
        if sep and module and part in ("A", "B"):
            return "lora", module, part
    raise ValueError(f"not a trainable-state key: '{key}'")


def lora_modules(state: dict[str, Tensor]) -> list[str]:
    """Module paths with LoRA factors in `state`, in key order."""
    modules = [name for kind, name, part in map(parse_key, state) if kind == "lora" and part == "A"]
    for module in modules:
        if f"{LORA_PREFIX}{module}::B" not in state:
            raise ValueError(f"module '{module}' has an A factor but no B factor")
    return modules


def head_groups(states: Sequence[dict[str, Tensor]]) -> list[list[int]]:
    """Client indices grouped by identical head keys and shapes (heads mix only within a group)."""
    groups: dict[tuple, list[int]] = {}
    for k, state in enumerate(states):
        signature = tuple(sorted((key, tuple(t.shape)) for key, t in state.items() if key.startswith(HEAD_PREFIX)))
        groups.setdefault(signature, []).append(k)
    return list(groups.values())


def check_same_keys(states: Sequence[dict[str, Tensor]]) -> None:
    """Clients of one group must carry the same trainable keys (ranks and head shapes may differ)."""
    if not states:
        raise ValueError("no client states given")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("all client states in a group must have the same keys")


def aggregate_states(
    states: Sequence[dict[str, Tensor]],
    weights: Sequence[float] | np.ndarray,
    *,
    alpha: float,
    mode: str,
    step: Step = None,
) -> list[dict[str, Tensor]]:
    """Aggregate one group's states; one new dict per client with its own keys, ranks and shapes.

    Adapters: 'svd' gives every client the best rank-r_k approximation of the weighted mean ΔW
    (also when ranks are equal, so all heterogeneous methods share one rule); 'fedavg' zero-pads.
    Heads: weighted mean among clients whose heads have the same shapes. A server `step` acts on the group's
    aggregate before it is shared out: per module on the dense mean ΔW (key `lora::<module>::dW`) for 'svd',
    on the padded mean A and B for 'fedavg', and on each head group's mean (`head_means`).
    """
    if mode not in AGGREGATIONS:
        raise AtlasError(f"unknown aggregation '{mode}'; choose one of {', '.join(AGGREGATIONS)}")
    check_same_keys(states)
    w = normalise_weights(weights, len(states))
    out: list[dict[str, Tensor]] = [{} for _ in states]
    for module in lora_modules(states[0]):
        a_key, b_key = f"{LORA_PREFIX}{module}::A", f"{LORA_PREFIX}{module}::B"
        if mode == "svd":
            factors = [(s[a_key], s[b_key], alpha / s[a_key].shape[0]) for s in states]
            new = svd_aggregate(factors, w, None if step is None else
                                lambda mean, module=module: step(f"{LORA_PREFIX}{module}::dW", mean))
        else:
            new = zero_pad_fedavg([(s[a_key], s[b_key]) for s in states], w, factor_step(step, module))
        for k, (A, B) in enumerate(new):
            out[k][a_key], out[k][b_key] = A, B
    head_means(states, w, out, step)
    return [{key: new[key] for key in state} for state, new in zip(states, out)]


def factor_step(step: Step, module: str) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """The server step on one module's mean (A, B), keyed by the factors' own state keys."""
    if step is None:
        return None
    return lambda A, B: (step(f"{LORA_PREFIX}{module}::A", A), step(f"{LORA_PREFIX}{module}::B", B))


def head_means(states: Sequence[dict[str, Tensor]], w: Sequence[float], out: list[dict[str, Tensor]],
               step: Step = None, combine: Combine | None = None) -> None:
    """Fill `out` with each client's head: the weighted mean, or `combine` of the heads (`robust_rule`), then the
    server `step`, keyed `head::<param>@<shape>` so heads of other shapes keep their own server state, among the
    clients whose heads have the same shapes; where nobody in a head group carries weight, each keeps its own."""
    for group in head_groups(states):
        group_w = [w[k] for k in group]
        for key in (k for k in states[group[0]] if k.startswith(HEAD_PREFIX)):
            tensors = [states[k][key] for k in group]
            mean = (None if sum(group_w) <= 0 else
                    combine(weighed(tensors, group_w)) if combine is not None else weighted_mean(tensors, group_w))
            if mean is not None and step is not None:
                mean = step(f"{key}@{'x'.join(map(str, mean.shape))}", mean)
            for k in group:
                out[k][key] = states[k][key].clone() if mean is None else mean.clone()


Combine = Callable[[Sequence[Tensor]], Tensor]
ROBUST_RULES = ("median", "trimmed_mean")


def weighed(tensors: Sequence[Tensor], weights: Sequence[float]) -> list[Tensor]:
    """The tensors that carry weight: a robust rule counts members, not weights, so a member of weight zero (a stand-in
    for an absent client, `Server.aggregate`) must not be one of them."""
    return [t for t, wk in zip(tensors, weights) if wk > 0]


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """The coordinate-wise median of equal-shape tensors (the mean of the two middle values of an even count), as
    Flower's FedMedian: one client, however far off, cannot move it past the honest majority's values."""
    ordered = torch.stack(list(tensors)).sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(tensors: Sequence[Tensor], fraction: float) -> Tensor:
    """The coordinate-wise mean after cutting floor(fraction x n) of the values off each end, as Flower's
    FedTrimmedAvg (Yin et al. 2018): up to that many clients per tail are ignored at every coordinate."""
    ordered = torch.stack(list(tensors)).sort(dim=0).values
    n = ordered.shape[0]
    cut = int(fraction * n)
    return ordered[cut:n - cut].mean(dim=0)


def robust_rule(rule: str | None, trim_fraction: float) -> Combine | None:
    """The unweighted robust combination `--robust-aggregation` names (shard sizes are the clients' own claims, so
    a robust rule does not weigh by them, as Flower's do not), or None for the weighted mean."""
    if rule is None:
        return None
    if rule == "median":
        return coordinate_median
    if rule == "trimmed_mean":
        return lambda tensors: trimmed_mean(tensors, trim_fraction)
    raise AtlasError(f"unknown robust aggregation '{rule}'; choose one of {', '.join(ROBUST_RULES)}")


def mean_of_parts(states: Sequence[dict[str, Tensor]], weights: Sequence[float] | np.ndarray, step: Step = None,
                  combine: Combine | None = None) -> list[dict[str, Tensor]]:
    """The weighted mean of every key of states that hold only some parts (B alone, A alone, with or without
    heads), for methods whose factors share one basis or one rank, where a mean of one factor is exact
    (FFA-LoRA's B under a common A) or is the rule itself (FedSA-LoRA's A). Factors must have equal shapes;
    heads mix only among same-shape heads, as in `aggregate_states`; a server `step` acts on each key's mean.
    With `combine` (`robust_rule`), each key is combined by it instead of the weighted mean."""
    check_same_keys(states)
    w = normalise_weights(weights, len(states))
    out: list[dict[str, Tensor]] = [{} for _ in states]
    for key in states[0]:
        if not key.startswith(HEAD_PREFIX):
            parse_key(key)  # only trainable-state keys
            tensors = [s[key] for s in states]
            mean = combine(weighed(tensors, w)) if combine is not None else weighted_mean(tensors, w)
            if step is not None:
                mean = step(key, mean)
            for k in range(len(states)):
                out[k][key] = mean.clone()
    head_means(states, w, out, step, combine)
    return [{key: new[key] for key in state} for state, new in zip(states, out)]


def sparsity_weighted_zero_pad(
    factors: Sequence[tuple[Tensor, Tensor]], fallback: Sequence[float] | np.ndarray,
    step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """HetLoRA's server rule for one module (Cho et al., 2024): zero-pad every (A_k, B_k) to the largest rank,
    average A and B separately with weights ‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F (the factors' own product, unscaled, as
    the paper writes it), and give client k the first r_k rows of A and columns of B (of the server `step`'s result
    on the padded means, where there is one). Where every product is zero (no client has an update yet) the
    `fallback` weights (shard sizes) are used instead of 0/0."""
    norms = [float(torch.linalg.matrix_norm(B.to(torch.float64) @ A.to(torch.float64))) for A, B in factors]
    return zero_pad_fedavg(factors, norms if sum(norms) > 0 else fallback, step)
