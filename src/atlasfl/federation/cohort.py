"""Who takes part in a round (docs/scale.md): a seeded uniform cohort, random dropouts, and the simulated clock's
deadline and first-m rule. The draws are pure functions of the run seed and the round, so a run resumed from a
checkpoint draws the cohorts the uninterrupted run drew, and both engines draw the same."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from atlasfl.phases.devices import PROFILES, simulated_seconds

# Why a client did not take part in a round (its entry's `participation`; "trained" when it did)
TRAINED, NOT_SAMPLED, DROPPED, STRAGGLER, SURPLUS = "trained", "not_sampled", "dropped_out", "straggler", "surplus"
FAILED = "failed"  # sampled and kept, but its engine reported it missing (`Trained.missing`)
_COHORT, _DROPOUT = 0, 1  # the two random streams of a round


def cohort(round_idx: int, seed: int, clients: Sequence[int], m: int | None, over_select: float | None = None
           ) -> list[int]:
    """The clients sampled in round `round_idx`: ceil(m x (1 + over_select)) of `clients` (at most all of them),
    uniformly without replacement; every client when `m` is None."""
    if m is None:
        return sorted(clients)
    n = min(len(clients), math.ceil(m * (1 + (over_select or 0.0))))
    picks = np.random.default_rng([seed, round_idx, _COHORT]).choice(sorted(clients), size=n, replace=False)
    return sorted(int(c) for c in picks)


def dropouts(round_idx: int, seed: int, sampled: Sequence[int], rate: float | None) -> set[int]:
    """The sampled clients that drop out of the round: each independently with probability `rate` (None: none)."""
    if not rate:
        return set()
    draws = np.random.default_rng([seed, round_idx, _DROPOUT]).random(len(sampled))
    return {c for c, u in zip(sorted(sampled), draws) if u < rate}


def replies(seconds: dict[int, float], m: int | None, deadline: float | None) -> tuple[list[int], dict[int, str],
                                                                                          float]:
    """Which replies the server keeps, given each answering client's simulated seconds: those in by the `deadline`,
    and of them the first `m` to arrive (ties by client id; all when `m` is None); the others with why
    (STRAGGLER: past the deadline, SURPLUS: after the first m); and the round's simulated seconds: the last kept
    reply's, or the deadline when the server waited for it in vain (fewer kept than it wanted)."""
    order = sorted(seconds, key=lambda c: (seconds[c], c))
    on_time = [c for c in order if deadline is None or seconds[c] <= deadline]
    kept = on_time if m is None else on_time[:m]
    left = {c: STRAGGLER for c in order if c not in on_time} | {c: SURPLUS for c in on_time[len(kept):]}
    wanted = len(seconds) if m is None else m
    waited = deadline if deadline is not None and len(kept) < wanted else max((seconds[c] for c in kept),
                                                                               default=0.0)
    return sorted(kept), left, waited


@dataclass
class Participation:
    """A round's cohort on the simulated clock: who takes part, why each other client does not, each sampled
    client's simulated seconds and the round's."""

    participants: list[int]
    left_out: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    round_s: float = 0.0
    deadline_s: float | None = None

    def record(self) -> dict:
        """The round's `simulated` block (schema RoundSimulated): every time in it is simulated."""
        return dict(round_s=self.round_s, deadline_s=self.deadline_s,
                    clients_s={str(c): s for c, s in sorted(self.seconds.items())},
                    left_out={str(c): why for c, why in sorted(self.left_out.items()) if why != NOT_SAMPLED})


def participation(cfg, round_idx: int, clients: Sequence[int], seconds_of) -> Participation:
    """Round `round_idx`'s cohort (`cohort`), less its dropouts (`dropouts`), less the replies the server does not
    keep (`replies`), each sampled client timed by `seconds_of(cid)` (its simulated seconds). Decided before any
    training, as the clock is a model: the engines train the participants only."""
    sampled = cohort(round_idx, cfg.seed, clients, cfg.clients_per_round, cfg.over_select)
    dropped = dropouts(round_idx, cfg.seed, sampled, cfg.dropout_rate)
    seconds = {c: seconds_of(c) for c in sampled}
    kept, late, round_s = replies({c: s for c, s in seconds.items() if c not in dropped}, cfg.clients_per_round,
                                  cfg.round_deadline)
    left = {c: NOT_SAMPLED for c in clients if c not in seconds} | dict.fromkeys(dropped, DROPPED) | late
    return Participation(kept, left, seconds, round_s, cfg.round_deadline)


def payload_sizes(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], head: int) -> dict[str, int]:
    """Numbers in each part of a client's state at `ranks` (module shapes (d_out, d_in); `head` parameters)."""
    return dict(lora_A=sum(r * shapes[m][1] for m, r in ranks.items()),
                lora_B=sum(r * shapes[m][0] for m, r in ranks.items()), head=head)


def client_seconds(*, device: str, params: int, tokens: int, sizes: dict[str, int], uploads: Sequence[str],
                   downloads: Sequence[str], itemsize: int, missed: int = 0) -> float:
    """A client's simulated round on its device profile (`devices.simulated_seconds`): `tokens` trained, the parts
    it sends (`uploads`) and receives (`downloads`) at the wire's `itemsize` bytes a number, and the numbers of what
    its group aggregated while it took no part (`missed`: `Server.missed`), received before it trains."""
    return simulated_seconds(PROFILES[device], params=params, tokens=tokens,
                             bytes_down=itemsize * (sum(sizes[p] for p in downloads) + missed),
                             bytes_up=itemsize * sum(sizes[p] for p in uploads))
