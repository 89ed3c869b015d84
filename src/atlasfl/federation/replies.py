"""Checks on the clients' replies before they are aggregated, shared by every engine (`federation.driver` calls
`check_replies` on what `Transport.train` returned): a reply with other keys or shapes than the client's planned
adapter and head, another dtype than the clients train in, a value that is not finite, or a norm far above its
group's median is left out of the round, as a client that failed (docs/security.md)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from atlasfl.methods.base import part_of

State = dict[str, torch.Tensor]
Spec = dict[str, tuple[int, ...]]
REPLY_DTYPE = torch.float32  # what a reply is decoded to on arrival (`federation.wire`, Flower's `records`)


def upload_spec(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], num_labels: int, hidden_size: int, *,
                head_bias: bool, parts: Sequence[str]) -> Spec:
    """The keys and shapes of the state a client at `ranks` uploads (the method's `uploads` parts): per adapted
    module of (d_out, d_in) `shapes`, A (r, d_in) and B (d_out, r); its head (labels, hidden) and a bias on
    encoders (`models.lora`'s flat state). Known to the server from the plan alone, before any state exists."""
    spec: Spec = {}
    for module, (d_out, d_in) in shapes.items():
        spec[f"lora::{module}::A"] = (ranks[module], d_in)
        spec[f"lora::{module}::B"] = (d_out, ranks[module])
    spec["head::weight"] = (num_labels, hidden_size)
    if head_bias:
        spec["head::bias"] = (num_labels,)
    return {key: shape for key, shape in spec.items() if part_of(key) in parts}


def reply_fault(state: State, spec: Spec) -> str | None:
    """Why one reply cannot be aggregated (its keys, a shape, a dtype, a value that is not finite), or None."""
    if set(state) != set(spec):
        extra, absent = sorted(set(state) - set(spec)), sorted(set(spec) - set(state))
        return f"rejected reply: keys differ from the planned state (unexpected {extra[:3]}, absent {absent[:3]})"
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            return f"rejected reply: {key} is not a tensor"
        if tuple(tensor.shape) != spec[key]:
            return f"rejected reply: {key} has shape {tuple(tensor.shape)}, the plan says {spec[key]}"
        if tensor.dtype != REPLY_DTYPE:
            return f"rejected reply: {key} has dtype {tensor.dtype}, replies arrive as {REPLY_DTYPE}"
        if not bool(torch.isfinite(tensor).all()):
            return f"rejected reply: {key} holds values that are not finite (NaN or inf)"
    return None


def state_norm(state: State) -> float:
    """The L2 norm of all of a state's tensors together (in float64: a huge reply must not overflow to inf)."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in state.values()))


def check_replies(uploads: dict[int, State], expected: dict[int, Spec], groups: list[list[int]],
                  norm_bound: float | None) -> tuple[dict[int, State], dict[int, str]]:
    """The replies fit to aggregate, and each rejected client with its reason. First each reply alone
    (`reply_fault` against its `expected` spec); then, with `norm_bound`, a reply whose norm exceeds
    `norm_bound` x the median norm of its group's sound replies (the lower median of an even count, so in a group
    of two the larger one is measured against the smaller). The kept replies are the same objects, untouched."""
    rejected = {cid: why for cid, state in uploads.items() if (why := reply_fault(state, expected[cid])) is not None}
    if norm_bound:
        for group in groups:
            sound = [cid for cid in group if cid in uploads and cid not in rejected]
            if not sound:
                continue
            norms = {cid: state_norm(uploads[cid]) for cid in sound}
            median = sorted(norms.values())[(len(norms) - 1) // 2]
            for cid, norm in norms.items():
                if norm > norm_bound * median:
                    rejected[cid] = (f"rejected reply: norm {norm:.4g} is over --reply-norm-bound {norm_bound:g} x its "
                                     f"group's median {median:.4g}")
    return {cid: state for cid, state in uploads.items() if cid not in rejected}, rejected
