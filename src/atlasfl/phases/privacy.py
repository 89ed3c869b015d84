"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; docs/privacy.md): each client's update (the
change of its uploaded state over the round, all tensors together) clipped to L2 norm C, Gaussian noise on the
group's mean (central) or on each clipped update (local), the clip optionally adapted to a target quantile of the
update norms (Andrew et al. 2021), and the privacy spent from Google's `dp-accounting` RDP accountant. Pure
functions over tensors; the noise comes from a generator the caller seeds."""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]
COVERS = ("user-level: each client's whole training shard, per aggregation group, over the training rounds only; "
          "phase 1's fingerprints (means and counts of each client's data) are released without noise and are "
          "not covered")


def update_norm(upload: State, start: State) -> float:
    """L2 norm of upload - start over all tensors together (float64)."""
    return math.sqrt(sum(float((upload[k].to(torch.float64) - start[k].to(torch.float64)).square().sum())
                         for k in upload))


def clip_update(upload: State, start: State, clip: float) -> State:
    """start + (upload - start)·min(1, C/‖upload - start‖): the update scaled into the L2 ball of radius C."""
    norm = update_norm(upload, start)
    if norm <= clip:
        return upload
    factor = clip / norm
    return {k: (start[k].to(torch.float64) + factor * (v.to(torch.float64) - start[k].to(torch.float64))).to(v.dtype)
            for k, v in upload.items()}


def gaussian(shape: Sequence[int], std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) draws in float64 from `generator`."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * std


def privatise_upload(upload: State, start: State, *, clip: float, noise: float, local: bool,
                     generator: torch.Generator | None) -> tuple[State, bool]:
    """A client's upload under DP: its update clipped to `clip`; with `local`, plus N(0, (noise·clip)²) on every
    coordinate of the clipped update (the client noises it itself, so the server never sees it bare). Also whether
    the update was within the clip (its norm <= `clip`): the bit adaptive clipping counts."""
    within = update_norm(upload, start) <= clip
    clipped = clip_update(upload, start, clip)
    if not local or noise == 0:
        return clipped, within
    return {k: (v.to(torch.float64) + gaussian(v.shape, noise * clip, generator)).to(v.dtype)
            for k, v in clipped.items()}, within


def count_noise(members: int, noise: float) -> float:
    """The default std σ_b of the noise on a group's count of unclipped updates: Andrew et al.'s m/20 for m
    members, raised where groups are small to √10·z/2, where the count spends a tenth of the round's Gaussian budget
    ((2σ_b)⁻² = z⁻²/10, so the update's noise multiplier is z/√0.9 = 1.054·z; m/20 alone would leave no budget
    for the update in a group of fewer than 10·z clients)."""
    return max(members / 20, math.sqrt(10) * noise / 2)


def update_noise(noise: float, count_std: float) -> float:
    """The noise multiplier z_Δ of the update's Gaussian when the round also releases a count of unclipped bits
    with noise std σ_b: the two together are one Gaussian release of multiplier z (Andrew et al. 2021, Thm 1; the
    bit's sensitivity is 1/2 once centred), so z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2). z = 0: no noise (ε = ∞)."""
    if noise == 0:
        return 0.0
    if 2 * count_std <= noise:
        raise ValueError(f"count noise σ_b = {count_std:g} leaves no privacy budget for the update at noise "
                         f"multiplier {noise:g}: it needs σ_b > z/2 = {noise / 2:g}")
    return (noise ** -2 - (2 * count_std) ** -2) ** -0.5


def next_clip(clip: float, unclipped: int, members: int, *, target: float, lr: float, count_std: float,
              generator: torch.Generator) -> tuple[float, float]:
    """The geometric clip update of Andrew et al. 2021: C·exp(−η_C(b̄ − γ)), b̄ the fraction of the group's
    `members` whose update was within the clip, noised as (Σb + N(0, σ_b²))/m; and that noised fraction."""
    fraction = (unclipped + float(gaussian((), count_std, generator))) / members
    return clip * math.exp(-lr * (fraction - target)), fraction


def noise_seed(seed: int, round_idx: int, name: str) -> int:
    """The noise generator's seed for one (run, round, group or client): a function of them alone, so a rerun
    and a resumed run draw the same noise."""
    return (seed * 1_000_003 + round_idx * 10_007 + zlib.crc32(name.encode())) % (2**63)


def epsilon(noise: float, rates: Sequence[float], delta: float) -> float:
    """ε at `delta` after one Gaussian release of noise multiplier `noise` per round, round t's client participation
    rate `rates[t]` (1: everybody; below 1 it is accounted as Poisson sampling), composed with `dp-accounting`'s
    RDP accountant (add/remove-one-client neighbours). No rounds: 0; no noise: ∞."""
    if not rates:
        return 0.0
    if noise == 0:
        return math.inf
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for q in rates:
        event = dp_accounting.GaussianDpEvent(noise)
        accountant.compose(event if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, event))
    return float(accountant.get_epsilon(delta))
