"""The versioned schema of a result JSON. Keys of the public predecessor are kept for its users' scripts
(`round_metrics`, `final_accuracies`, `cluster_labels`, `phase1_clustering`, `phase2_rank_allocation`,
`communication_costs`, `time_metrics`, `config`). Client ids are JSON object keys, hence strings."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.3"
# 1.1: per-round phase clocks and work (time_metrics.rounds/totals), lambda-sweep totals
# 1.2: the personal protocol (personal_* per client, round and task), `references`, per-client eta selection;
#      phase1_clustering's spread-to-noise rule: threshold_by_k, dof_by_k, significance (noise_ratio dropped);
#      Flower rounds record the clients missing from them (missing_clients, missing_reasons, ClientRound.missing)
# 1.3: a tuned run's `tuning` block (--tune N); phase1_clustering's passing_k, split and ambiguous; a round's
#      `clusters` (ifca, cfl: the clusters found during training, with their ARI); added fields, no bump: a round's
#      `evaluated` (false: no test this round, --eval-every) and `metrics_from_round` for a client it carries;
#      a round's `participants` and `simulated` clock, a client's `participation` and `simulated_s` (client
#      sampling, docs/scale.md), a `train_loss` of None for a client tested before it first trained; `privacy`
#      (--dp-clip), per round and per result; adaptive clipping's `clips` per round and `adaptive_clipping`;
#      a round's `caught_up` (client sampling: who was sent the aggregates it missed)
KNOWN_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
PERSONAL = ("personal protocol (1.2 on): the client's personal test set, rows of the task's test set whose label mix "
            "follows the client's training shard (data.partition.personal_test_rows), scored from the same predictions")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientRound(_Strict):
    client_id: int
    task: str
    train_loss: Optional[float] = Field(description="mean training loss (None: the client has not trained yet in "
                                                    "this eta, or did not train in this round but was tested)")
    test_loss: float
    test_accuracy: float
    test_macro_f1: float
    test_f1: Optional[float] = Field(description="F1 of the positive class (binary tasks only)")
    test_mcc: float
    test_metric: float = Field(description="the task's GLUE metric (see metric_name)")
    metric_name: str
    bytes_up: int
    bytes_down: int
    personal_loss: Optional[float] = Field(default=None, description=PERSONAL)
    personal_accuracy: Optional[float] = None
    personal_macro_f1: Optional[float] = None
    personal_f1: Optional[float] = None
    personal_mcc: Optional[float] = None
    personal_metric: Optional[float] = Field(default=None, description="the task's GLUE metric on the personal set")
    personal_n: Optional[int] = Field(default=None, description="rows in the client's personal test set")
    missing: bool = Field(default=False, description="Flower: the client failed or did not reply this round; it "
                                                     "kept its last state and its metrics are those of "
                                                     "`metrics_from_round`")
    metrics_from_round: Optional[int] = Field(default=None, description=(
        "the round a client's test metrics come from when it was not tested in this one: missing or not sampled "
        "(its train loss comes from there too) or a round without evaluation (--eval-every; its train loss is "
        "this round's)"))
    participation: Optional[str] = Field(default=None, description=(
        "trained (its training was aggregated), not_sampled, dropped_out, straggler (past --round-deadline on the "
        "simulated clock), surplus (after the first --clients-per-round replies) or failed (missing); a client "
        "that did not train keeps its state (unless the round's `caught_up` lists it), and its metrics are those of "
        "`metrics_from_round` unless it was tested this round (docs/scale.md)"))
    simulated_s: Optional[float] = Field(default=None, description=(
        "SIMULATED seconds of this client's round on its device profile (training FLOPs at its compute rate plus "
        "its bytes at its bandwidth, an estimate: docs/scale.md); None: not sampled"))


class RoundClusters(_Strict):
    labels: list[int] = Field(description="client id order: the cluster each client is in at the end of the round")
    ari: float = Field(description="adjusted Rand index of `labels` against the true tasks (phase 1's beside it: "
                                   "phase1_clustering.ari)")
    rule_saw: Optional[list[dict[str, Any]]] = Field(default=None, description=(
        "cfl: each cluster its split rule looked at this round (members, mean_norm, max_norm, split)"))


class RoundSimulated(_Strict):
    round_s: float = Field(description="SIMULATED seconds of the round: the last kept reply's, or the deadline when "
                                       "the server waited for it in vain")
    deadline_s: Optional[float] = Field(description="--round-deadline (simulated seconds), None: none")
    clients_s: dict[str, float] = Field(description="client id -> SIMULATED seconds, for every sampled client")
    left_out: dict[str, str] = Field(description="sampled client id -> why its reply was not kept (dropped_out, "
                                                 "straggler, surplus)")


class GroupClip(_Strict):
    clip: float = Field(description="the clip the group's members used this round (their largest)")
    within_fraction: float = Field(description="the noised fraction of its replying members whose update was within "
                                               "the clip (what the server saw; can fall outside [0, 1])")
    next_clip: float = Field(description="the clip every member uses next round")
    update_noise_multiplier: float = Field(description="z_Δ, the update's noise multiplier the count left of z")


class RoundPrivacy(_Strict):
    epsilon: Optional[float] = Field(description="ε at `delta` spent by the training rounds so far (null: ∞)")
    epsilon_infinite: bool = Field(description="no noise was added (--dp-noise 0): ε is ∞")
    delta: float
    participation_rate: float = Field(description="the share of the clients asked to train this round (accounted)")
    rounds_accounted: int
    clips: Optional[dict[str, GroupClip]] = Field(default=None, description=(
        "--dp-target-quantile: sharing group (its client ids, comma-joined) -> its clip this round"))


class AdaptiveClipping(_Strict):
    rule: str
    target_quantile: float
    lr: float
    count_noise: float | str = Field(description="--dp-count-noise σ_b, or the default rule")


class Privacy(_Strict):
    mechanism: str
    clip: float = Field(description="--dp-clip: the L2 bound on each client's update (all tensors together); "
                                    "under adaptive clipping its start")
    noise_multiplier: float = Field(description="--dp-noise z (under adaptive clipping: of the update and the "
                                                "count together)")
    adaptive_clipping: Optional[AdaptiveClipping] = Field(default=None, description=(
        "--dp-target-quantile: the clip's rule (null: the clip stays --dp-clip)"))
    effective_noise_multiplier: float = Field(description="what one client meets: z (central), z/2 (local)")
    mode: str
    delta: float
    epsilon: Optional[float] = Field(description="ε at `delta` after the last round run (null: ∞)")
    epsilon_infinite: bool
    epsilon_budget: Optional[float] = None
    stopped_by_budget: bool = Field(description="the run stopped before a round that would exceed the budget")
    covers: str = Field(description="what the guarantee covers")
    neighbouring: str = Field(description="the neighbouring relation ε is stated for")
    weights: str
    accountant: str
    phase1_fingerprints: str = Field(description="phase 1's fingerprints are released without noise, outside ε")


class RoundEntry(_Strict):
    round: int
    clients: list[ClientRound]
    mean_accuracy: float
    task_scores: dict[str, float]
    mean_task_score: float
    time_s: float
    bytes_up_total: int
    bytes_down_total: int
    state_digests: dict[str, str] = Field(description="client id -> digest of its trainable state after aggregation, "
                                                      "for every client that has trained in this eta so far")
    lambda_eta: Optional[float] = None
    personal_task_scores: Optional[dict[str, float]] = Field(default=None, description=PERSONAL)
    mean_personal_task_score: Optional[float] = None
    missing_clients: list[int] = Field(default=[], description="clients that failed, did not reply or whose reply "
                                                               "was rejected (docs/security.md) this round; the "
                                                               "round went on without them")
    missing_reasons: dict[str, str] = Field(default={}, description="client id -> why it was missing (the engine's "
                                                                    "error, or why its reply was rejected)")
    clusters: Optional[RoundClusters] = Field(default=None, description=(
        "ifca, cfl (clusters found during training): the clusters at the end of the round"))
    evaluated: Optional[bool] = Field(default=None, description=(
        "false: no client took its test set this round (--eval-every K); each client's test metrics, and so the "
        "round's scores, are carried from its `metrics_from_round`. Absent: the round was tested"))
    participants: Optional[list[int]] = Field(default=None, description=(
        "the clients whose training the round aggregated (every client that replied, without client sampling)"))
    simulated: Optional[RoundSimulated] = Field(default=None, description=(
        "the round on the simulated clock of the device profiles (docs/scale.md): estimates, not measurements"))
    privacy: Optional[RoundPrivacy] = Field(default=None, description="--dp-clip: the privacy spent so far")
    caught_up: Optional[list[int]] = Field(default=None, description=(
        "client sampling: the clients sent, before they trained or were tested this round, what their sharing "
        "groups aggregated while they took no part (the group's latest model; flora: every merge missed); their "
        "bytes_down include it (docs/scale.md). Absent: nobody"))


class Work(_Strict):
    examples: int
    real_tokens: int = Field(description="token positions that are not padding")
    padded_tokens: int = Field(description="token positions computed, padding included")


class RoundCost(_Strict):
    eta: float
    round: int
    train_s: float
    aggregate_s: float = Field(description="aggregation, or the Laplacian step, with the wire trips")
    evaluate_s: float = Field(description="test-set evaluation")
    checkpoint_s: Optional[float] = Field(description="writing the round's checkpoint (None: not measured)")
    train: Work
    evaluate: Work
    clients_s: Optional[dict[str, float]] = Field(
        description="Flower: the seconds the clients measured inside training and evaluation, summed over clients")


class TaskMetrics(_Strict):
    metric_name: str
    score: float = Field(description="the task's GLUE metric, mean over its clients")
    accuracy: float
    macro_f1: float
    f1: Optional[float] = None
    mcc: float
    num_clients: int


class FinalMetrics(_Strict):
    per_client: dict[str, dict[str, Any]] = Field(
        description="the global metrics, personal_* ones (1.2 on), the client's local-validation score, device "
                    "and whether it diverged")
    per_task: dict[str, TaskMetrics]
    task_mean: float
    personal_per_task: Optional[dict[str, TaskMetrics]] = Field(default=None, description=PERSONAL)
    personal_task_mean: Optional[float] = None


class Scores(_Strict):
    score: float = Field(description="the task's GLUE metric")
    accuracy: float
    macro_f1: float
    f1: Optional[float] = None
    mcc: float


class ProtocolReference(_Strict):
    majority: Scores = Field(description="always predicting the majority label of the training data: the task's "
                                         "training pool (global), each client's own shard (personal, mean over "
                                         "the task's clients)")
    chance: Scores = Field(description="uniform random guessing, from expected confusion counts: accuracy 1/K, "
                                       "F1 of class l 2p_l/(Kp_l+1), MCC 0 (metrics.chance_scores)")


class ClientSetup(_Strict):
    client_id: int
    task: str
    num_train: int
    num_val: int


class CommunicationCosts(_Strict):
    wire_dtype: str
    total_bytes_up: int
    total_bytes_down: int
    fingerprint_bytes_up: int
    per_client_bytes_up: dict[str, int]
    per_client_bytes_down: dict[str, int]
    note: str = "bytes of the tensors actually sent (adapters, heads, fingerprints); frozen weights are never sent"
    transport: Optional[dict[str, Any]] = Field(
        default=None,
        description="Flower engine only: the message sizes Flower carried, per phase, beside this accounting")
    sweep_total_bytes_up: Optional[int] = Field(
        default=None, description="lambda sweep: bytes up of every eta's federation (the totals above: the chosen "
                                  "eta's), fingerprints counted once")
    sweep_total_bytes_down: Optional[int] = Field(default=None, description="lambda sweep: bytes down of every eta")
    per_eta: Optional[list[dict[str, float]]] = Field(default=None,
                                                      description="lambda sweep: bytes up/down of each eta's rounds")


class TimeMetrics(_Strict):
    total_s: float
    setup_s: float
    per_round_s: list[float] = Field(description="wall seconds of each round of the chosen eta")
    phases_s: dict[str, float] = {}
    rounds: list[RoundCost] = Field(default=[], description="phase seconds and work of every trained round "
                                                            "(every eta of a sweep); absent before schema 1.1")
    totals: Optional[dict[str, Any]] = Field(default=None, description="sums of `rounds`: the run's true cost, "
                                                                       "every eta of a sweep included")
    clock_note: Optional[str] = Field(default=None, description="where the engine's phase clocks run")


class MemoryMetrics(_Strict):
    peak_measured_bytes: int
    measured_by: str
    estimate: Optional[dict[str, Any]] = Field(default=None,
                                               description="memory model of §3.2: an ESTIMATE, not measured")


class SecondLook(_Strict):
    """docs/clustering.md#the-second-look: phase 1's clusters tested against round 1's adapter updates."""

    mode: str = Field(description="--second-look: on, or auto (on because phase 1 was ambiguous)")
    phase1_labels: list[int] = Field(description="client id order: phase 1's clusters, the groups of round 1")
    phase1_ari: float = Field(description="adjusted Rand index of phase1_labels against the true tasks")
    labels: Optional[list[int]] = Field(description="client id order: the refined clusters, the groups from "
                                                    "`effective_from_round` on (None: skipped)")
    ari: Optional[float] = Field(description="adjusted Rand index of `labels` against the true tasks")
    changed: bool = Field(description="the refined clusters differ from phase 1's")
    extra_rounds: int = Field(description="rounds it adds: none, it reads round 1's uploads")
    effective_from_round: int
    extra_bytes_up: int = Field(description="bytes uploaded in round 1 only for it: the states of the clients "
                                            "outside phase 1's sharing groups (`extra_uploaders`), at the wire dtype")
    extra_uploaders: list[int]
    server_s: float = Field(description="server seconds of the look (updates, cosines, tests)")
    skipped: Optional[str] = Field(description="why no look was taken (a client missing in round 1), or None")
    splits: list[dict[str, Any]] = Field(default=[], description=(
        "each phase-1 cluster of 3+ clients: its bipartition by update cosine (`parts`), the ANOVA ratio "
        "`statistic`, its `threshold` and whether it was `split`"))
    merges: list[dict[str, Any]] = Field(default=[], description=(
        "results written before 2026-12-03 only: the merges the former rule made at F <= 1 (two `groups`, "
        "`statistic`, `threshold`); the look no longer merges phase 1's clusters"))
    effective_dims: Optional[float] = Field(default=None, description="r, the noise's effective dimensions")
    significance: Optional[float] = None
    similarity: Optional[list[list[float]]] = Field(default=None, description="cosines of the round-1 updates")


class Result(_Strict):
    schema_version: str = SCHEMA_VERSION
    status: str = "complete"
    run_name: str
    model: str
    method: str
    seed: int
    config: dict[str, Any]
    clients: list[ClientSetup]
    round_metrics: list[RoundEntry]
    final_accuracies: dict[str, float]
    final_metrics: FinalMetrics
    diverged_clients: list[int] = Field(
        default_factory=list,
        description="clients whose training diverged (federation.records.DIVERGENCE_RULE: a round's mean training "
                    "loss not finite, or above 10 x the smaller of its first-round loss and ln(labels)); each is "
                    "also flagged `diverged` in final_metrics.per_client")
    cluster_labels: list[int]
    cluster_source: str
    phase1_clustering: Optional[dict[str, Any]] = None
    second_look: Optional[SecondLook] = Field(default=None, description=(
        "--second-look (1.3 on): phase 1's clusters and the refined ones from round 2, their ARI and what it cost; "
        "None where no look was taken"))
    phase2_rank_allocation: dict[str, Any]
    ranks: dict[str, dict[str, int]]
    lambda_sweep: Optional[dict[str, Any]] = Field(
        default=None, description="grid, val/test/personal scores per eta, the shared eta; `selections` (1.2 on): "
                                  "the shared and the per-client choice, each with its final_metrics, and which one "
                                  "is the headline final_metrics")
    references: Optional[dict[str, dict[str, ProtocolReference]]] = Field(
        default=None, description="task -> 'global'/'personal' -> majority-class and chance scores (1.2 on)")
    tuning: Optional[dict[str, Any]] = Field(
        default=None, description="--tune N (1.3 on): the Optuna study the run's settings were chosen by: study, "
                                  "storage, seed, budget (trials, rounds per trial, finished, pruned), space, untuned "
                                  "values, the best trial (params, val_score, val_scores per round) and every trial")
    privacy: Optional[Privacy] = Field(default=None, description=(
        "--dp-clip (client-level DP, docs/privacy.md): the mechanism, what its guarantee covers, the ε spent"))
    communication_costs: CommunicationCosts
    time_metrics: TimeMetrics
    memory: MemoryMetrics
    environment: dict[str, Any]


def validate_result(data: dict) -> Result:
    return Result.model_validate(data)


def json_schema() -> dict:
    return Result.model_json_schema()
