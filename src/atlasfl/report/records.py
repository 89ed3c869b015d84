"""One internal record per run, whatever wrote the file (this package or its predecessor), so tables
and plots read a single shape."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atlasfl.config import dp_label, server_optimizer_label
from atlasfl.methods import METHODS


@dataclass(frozen=True)
class TaskScore:
    metric: str  # 'accuracy', 'f1' or 'mcc': the task's GLUE metric
    score: float
    accuracy: float


@dataclass
class RunRecord:
    """What a report needs from one run. Optional numbers are None when the file does not hold them."""

    source: Path
    model: str
    method: str
    seed: int
    eta: str | None  # the variant (Method.variant): atlas's eta or 'sweep', a field method's 'in clusters', ...
    tasks: dict[str, TaskScore]
    task_mean: float
    client_scores: dict[int, float]  # final GLUE metric per client
    client_tasks: dict[int, str]
    rounds: list[int] = field(default_factory=list)
    round_task_scores: list[dict[str, float]] = field(default_factory=list)  # aligned with rounds
    round_client_scores: list[dict[int, float]] = field(default_factory=list)  # aligned with rounds
    round_bytes: list[int] = field(default_factory=list)  # bytes up and down of all clients, aligned with rounds
    round_ari: list[float | None] = field(default_factory=list)  # ARI of the clusters found in training (ifca, cfl)
    bytes_up: int | None = None
    bytes_down: int | None = None
    time_s: float | None = None
    round_phase_s: dict[str, float] | None = None  # mean seconds per trained round: train, aggregate, evaluate
    padding_share: float | None = None  # of the token positions computed in training and evaluation
    sweep_totals: bool = False  # bytes are the totals of every eta of a lambda sweep
    peak_memory_bytes: int | None = None
    participants: float | None = None  # mean clients per round whose training was aggregated (docs/scale.md)
    simulated_round_s: float | None = None  # mean SIMULATED seconds per round, from the device profiles
    clustering: dict[str, Any] = field(default_factory=dict)  # phase1_clustering ('ari', 'k', 'similarity', 'labels')
    clusters_from: str | None = None  # where its sharing groups come from (`Method.clusters_from`)
    fingerprint_bytes: int | None = None  # phase 1's upload, counted where the method uses it
    second_look: dict[str, Any] | None = None  # the result's `second_look` block (phase 1's clusters refined)
    lambda_sweep: dict[str, Any] | None = None
    note: str | None = None
    protocol: str = "global"  # which test sets the scores above come from: 'global' or 'personal'
    references: dict[str, dict[str, TaskScore]] | None = None  # task -> 'majority'/'chance', on this protocol
    personal: dict[str, Any] | None = None  # the personal protocol's values of the fields above (schema 1.2 on)
    diverged: list[int] = field(default_factory=list)  # clients flagged by the divergence rule (diverged_clients)
    tuned: int | None = None  # --tune N: the trials of the study its settings were chosen by
    privacy: dict[str, Any] | None = None  # --dp-clip: the result's `privacy` block (ε spent, what it covers)

    @property
    def method_label(self) -> str:
        """The method with its variant: `atlas (η=0.1)`, `atlas (η=sweep)`, `fedprox (in clusters, mu0.1)`, and
        `, tuned ×8` after a study of 8 trials."""
        known = METHODS.get(self.method)
        variant = None if self.eta is None else (
            f"η={self.eta}" if known is None or known.personalises else self.eta)
        parts = [p for p in (variant, f"tuned ×{self.tuned}" if self.tuned else None) if p]
        return f"{self.method} ({', '.join(parts)})" if parts else self.method


PROTOCOLS = ("global", "personal")


def in_protocol(r: RunRecord, protocol: str) -> RunRecord | None:
    """The run as seen on one protocol's test sets (its scores, curves and references); None when the file
    does not hold that protocol (results before schema 1.2, the predecessor's)."""
    if protocol == r.protocol:
        return r
    if protocol == "personal" and r.personal is not None:
        return replace(r, protocol="personal", personal=None, **r.personal)
    return None


def eta_label(method: str, config: dict, searched=()) -> str | None:
    """A method's variants (atlas at different η, or its sweep) are different rows of a table: the method object
    names them (`Method.variant`), and a server optimiser adds its own name; a method this version does not know
    (the predecessor's) has none. Settings a study `searched` name no variant: a tuned run's row is the method's,
    tuned."""
    if method not in METHODS:
        return None
    kept = {k: v for k, v in config.items() if k not in searched}
    return ", ".join(p for p in (METHODS[method].variant(kept), server_optimizer_label(kept), dp_label(kept))
                     if p) or None
