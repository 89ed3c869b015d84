"""Client-level DP as a run config asks for it (`--dp-clip`, docs/privacy.md): what a client uploads, the privacy
each round spends and the result's `privacy` block. The math is `phases.privacy`."""
from __future__ import annotations

import math

import torch

from atlasfl.config import RunConfig
from atlasfl.phases.privacy import COVERS, epsilon, noise_seed, privatise_upload

State = dict[str, torch.Tensor]


def client_upload(cfg: RunConfig, upload: State, start: State, round_idx: int, cid: int, clip: float
                  ) -> tuple[State, bool]:
    """What a client sends in round `round_idx` under DP: its update clipped to `clip` (the server's clip for it
    this round: `Server.clips_for`) and, in local mode, noised with a generator seeded from the run seed, round and
    client, on top of `start` (its state of those keys before the round's training); and whether the update was
    within the clip. Both engines call it before the wire trip."""
    local = cfg.dp_mode == "local"
    generator = torch.Generator().manual_seed(noise_seed(cfg.seed, round_idx, f"client {cid}")) if local else None
    return privatise_upload(upload, start, clip=clip, noise=cfg.dp_noise, local=local, generator=generator)


def multiplier(cfg: RunConfig) -> float:
    """The noise multiplier one client's update meets under add/remove-one-client neighbours. Central: z (noise of
    std zC on a sum of updates each of norm <= C). Local: z/2 (each client's own release exists either way, so its
    neighbour is a replaced shard, sensitivity 2C), with no amplification: the server sees who took part."""
    return cfg.dp_noise if cfg.dp_mode == "central" else cfg.dp_noise / 2


def round_privacy(cfg: RunConfig, rates: list[float], clips: dict[str, dict] | None = None) -> dict | None:
    """A round entry's `privacy`: ε at δ after the rounds so far (round t's participation rate `rates[t]`) and,
    under adaptive clipping, each group's clip this round (`Server.round_clips`); None without DP. ε is ∞ (JSON:
    null with `epsilon_infinite`) when no noise is added."""
    if cfg.dp_clip is None:
        return None
    if cfg.dp_mode == "local":
        rates = [1.0] * len(rates)
    eps = epsilon(multiplier(cfg), rates, cfg.dp_delta)
    out = dict(epsilon=None if math.isinf(eps) else eps, epsilon_infinite=math.isinf(eps), delta=cfg.dp_delta,
               participation_rate=rates[-1], rounds_accounted=len(rates))
    if cfg.dp_target_quantile is not None:
        out["clips"] = dict(clips or {})
    return out


def privacy_block(cfg: RunConfig, rounds: list[dict], stopped_by_budget: bool) -> dict | None:
    """The result's `privacy`: the mechanism, what its guarantee covers, and the ε spent (the last round's)."""
    if cfg.dp_clip is None:
        return None
    last = rounds[-1]["privacy"] if rounds else dict(epsilon=0.0, epsilon_infinite=False)
    adaptive = None if cfg.dp_target_quantile is None else dict(
        rule="Andrew et al. 2021: each group's clip C <- C·exp(-lr·(b - quantile)), b its members' noised fraction of "
             "unclipped updates; the update's noise multiplier is what the count leaves of z",
        target_quantile=cfg.dp_target_quantile, lr=cfg.dp_clip_lr,
        count_noise=cfg.dp_count_noise if cfg.dp_count_noise is not None else "max(m/20, sqrt(10)·z/2), m the group's "
        "replying members")
    return dict(mechanism=f"DP-FedAvg, {cfg.dp_mode} Gaussian" + (", adaptive clipping" if adaptive else ""),
                clip=cfg.dp_clip, noise_multiplier=cfg.dp_noise, adaptive_clipping=adaptive,
                effective_noise_multiplier=multiplier(cfg), mode=cfg.dp_mode, delta=cfg.dp_delta,
                epsilon=last["epsilon"], epsilon_infinite=last["epsilon_infinite"],
                epsilon_budget=cfg.dp_epsilon_budget, stopped_by_budget=stopped_by_budget, covers=COVERS,
                neighbouring="add/remove one client (with its whole shard)" if cfg.dp_mode == "central"
                else "replace one client's shard", weights="uniform over a group's replying clients",
                accountant="dp-accounting RDP (Gaussian; Poisson-subsampled where the participation rate is < 1)",
                phase1_fingerprints="released without noise: not covered by epsilon")
