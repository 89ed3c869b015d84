"""The records every engine keeps of a run, assembled the same way: one client's data from its id
alone, a client's round record and the reference points of its test sets, a round's summary and its
log line, the eta grid, each eta's run, the choices of eta after a sweep, and which clients diverged.

The in-process engine and the Flower app both call these, so a result JSON means the same whichever
engine wrote it.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict

import numpy as np

from atlasfl.config import RunConfig
from atlasfl.data.partition import ClientShard, task_shards
from atlasfl.data.tasks import TaskData, expand_tasks, load_task
from atlasfl.errors import AtlasError
from atlasfl.metrics import chance_scores, majority_scores

log = logging.getLogger("atlasfl")


def num_clients(cfg: RunConfig) -> int:
    return len(expand_tasks(cfg.tasks)) * cfg.clients_per_task


def load_client_data(cfg: RunConfig, client_id: int) -> tuple[ClientShard, TaskData]:
    """Client `client_id`'s shard and task, loading only that task: what one machine of a real
    deployment holds. Ids run over tasks in order, as in `make_shards`, so the shard is the same."""
    names = expand_tasks(cfg.tasks)
    if not 0 <= client_id < num_clients(cfg):
        raise AtlasError(f"client id {client_id} is outside 0..{num_clients(cfg) - 1} "
                         f"({len(names)} tasks x {cfg.clients_per_task} clients per task)")
    task_index, j = divmod(client_id, cfg.clients_per_task)
    task = load_task(names[task_index], data_dir=cfg.data_dir, max_test=cfg.max_test_samples)
    shards = task_shards(task, cfg.clients_per_task, first_id=task_index * cfg.clients_per_task,
                         **partition_settings(cfg))
    return shards[j], task


def partition_settings(cfg: RunConfig) -> dict:
    """The settings that cut the shards (`data.partition.make_shards`, `task_shards`): every engine cuts alike."""
    return dict(seed=cfg.seed, max_samples=cfg.max_samples, dirichlet_alpha=cfg.dirichlet_alpha,
                val_fraction=cfg.val_fraction, labels_per_client=cfg.labels_per_client, quantity_skew=cfg.quantity_skew)


PERSONAL_KEYS = ("loss", "accuracy", "macro_f1", "f1", "mcc", "n")


def client_round(client_id: int, task: str, train_loss: float | None, ev: dict, bytes_up: int, bytes_down: int
                 ) -> dict:
    """One client's entry of a round (schema ClientRound) from its training loss (None: it did not train this
    round) and test evaluation (`federation.evaluation.test_scores`: the global protocol, and the personal one
    under `personal`)."""
    entry = dict(client_id=client_id, task=task, train_loss=train_loss, test_loss=ev["loss"],
                 test_accuracy=ev["accuracy"], test_macro_f1=ev["macro_f1"], test_f1=ev["f1"], test_mcc=ev["mcc"],
                 test_metric=ev["score"], metric_name=ev["metric_name"], bytes_up=bytes_up, bytes_down=bytes_down)
    if "personal" in ev:
        entry.update({f"personal_{k}": ev["personal"][k] for k in PERSONAL_KEYS},
                     personal_metric=ev["personal"]["score"])
    return entry


def kept_round(rounds: list[dict], cid: int, bytes_up: int, bytes_down: int) -> dict:
    """The round record of a client not tested this round (missing, or not taking part): the metrics of its last
    round with a test (it keeps that round's state, or the state the server sent it this round), labelled as
    such; its bytes are this round's."""
    round_idx, last = _last_tested(rounds, cid)
    return dict(last, metrics_from_round=round_idx, bytes_up=bytes_up, bytes_down=bytes_down)


def untested_round(rounds: list[dict], cid: int, train_loss: float, bytes_up: int, bytes_down: int) -> dict:
    """A client's record of a round it trained in without a test (`--eval-every`): this round's training loss and
    bytes, and the test metrics of its last tested round, labelled by `metrics_from_round`."""
    round_idx, last = _last_tested(rounds, cid)
    return dict(last, train_loss=train_loss, metrics_from_round=round_idx, bytes_up=bytes_up, bytes_down=bytes_down)


def _last_tested(rounds: list[dict], cid: int) -> tuple[int, dict]:
    """The last round in which the client was tested, and its record there (whose metrics are its own of that
    round: no `metrics_from_round`)."""
    return next((e["round"], c) for e in reversed(rounds) for c in e["clients"]
                if c["client_id"] == cid and c.get("metrics_from_round") is None)


def is_test_round(cfg: RunConfig, round_idx: int) -> bool:
    """Whether the clients take their test sets in this round (`--eval-every K`): every K-th round, the first (so
    every round after it has metrics to carry) and the last (so the final scores are always measured)."""
    return round_idx == 1 or round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds


def warn_missing(round_idx: int, missing: dict[int, str]) -> None:
    """Say loudly, in the log and on stderr, which clients are left out of this round and why."""
    for cid, reason in sorted(missing.items()):
        msg = f"warning: client {cid} is missing from round {round_idx} ({reason}); it keeps its last state"
        log.warning(msg)
        print(msg, file=sys.stderr)


def client_references(shard: ClientShard, task: TaskData) -> dict:
    """The reference points of one client's two test sets (`metrics.majority_scores`, `chance_scores`):
    global: the task's training-pool majority label on the task's test set; personal: the client's own
    training majority on its personal rows. Computed where the data is (a Flower client sends them)."""
    test = [ex.label for ex in task.test]
    personal = [test[i] for i in shard.personal]
    k, metric = task.num_labels, task.metric
    own = [ex.label for ex in shard.train + shard.val]
    return {"global": dict(majority=majority_scores([ex.label for ex in task.train], test, k, metric),
                           chance=chance_scores(test, k, metric)),
            "personal": dict(majority=majority_scores(own, personal, k, metric),
                             chance=chance_scores(personal, k, metric))}


def round_cost(*, train_s: float, aggregate_s: float, evaluate_s: float, work: dict, clients_s: dict | None = None,
               ) -> dict:
    """A round's clock and work (schema RoundCost): seconds of training, aggregation (or the Laplacian step)
    and evaluation, the `Tally` of training and of evaluation, and, where clients time themselves apart
    from the server's clock (Flower), the sum of their own seconds per phase. Checkpoint seconds are added
    once the round is saved."""
    return dict(train_s=train_s, aggregate_s=aggregate_s, evaluate_s=evaluate_s, checkpoint_s=None,
                train=asdict(work["train"]), evaluate=asdict(work["evaluate"]), clients_s=clients_s)


def round_summary(round_idx: int, clients: list[dict], task_names: list[str], time_s: float,
                  digests: dict[str, str], eta: float | None = None, cost: dict | None = None,
                  missing: dict[str, str] | None = None, clusters: dict | None = None, tested: bool = True,
                  participants: list[int] | None = None, simulated: dict | None = None,
                  privacy: dict | None = None, caught_up: list[int] | None = None) -> dict:
    """A round's entry (schema RoundEntry): task scores are the mean over each task's clients; `eta`
    (the Laplacian step of a personalising method) is recorded as `lambda_eta`. Its `cost` (`round_cost`)
    travels with the round and moves to `time_metrics` in the result. `missing` (client id -> why it
    was left out of the round) becomes `missing_clients` and `missing_reasons`; `clusters` (`Server.round_clusters`:
    a method that finds its clusters during training), `participants` (the clients whose training the round
    aggregated), `simulated` (`cohort.Participation.record`) and `privacy` (`federation.privacy.round_privacy`:
    the ε spent so far under --dp-clip) are kept as they are, and so are `caught_up` (the clients sent what their
    groups aggregated while they took no part: `Method.catch_up`) where there are any; a round without a test
    (`is_test_round`) is marked `evaluated: false`, and its scores are the means of the carried metrics."""
    task_scores = {t: float(np.mean([c["test_metric"] for c in clients if c["task"] == t])) for t in task_names}
    entry = dict(round=round_idx, clients=clients, mean_accuracy=float(np.mean([c["test_accuracy"] for c in clients])),
                 task_scores=task_scores, mean_task_score=float(np.mean(list(task_scores.values()))), time_s=time_s,
                 bytes_up_total=sum(c["bytes_up"] for c in clients),
                 bytes_down_total=sum(c["bytes_down"] for c in clients), state_digests=digests)
    if all("personal_metric" in c for c in clients):
        personal = {t: float(np.mean([c["personal_metric"] for c in clients if c["task"] == t])) for t in task_names}
        entry.update(personal_task_scores=personal, mean_personal_task_score=float(np.mean(list(personal.values()))))
    if eta is not None:
        entry["lambda_eta"] = eta
    if missing is not None:
        entry.update(missing_clients=sorted(map(int, missing)), missing_reasons=missing)
    if cost is not None:
        entry["cost"] = cost
    if clusters is not None:
        entry["clusters"] = clusters
    if not tested:
        entry["evaluated"] = False
    if participants is not None:
        entry.update(participants=participants, simulated=simulated)
    if privacy is not None:
        entry["privacy"] = privacy
    if caught_up:
        entry["caught_up"] = caught_up
    return entry


def log_round(eta: float, entry: dict) -> None:
    carried = " (carried from the last test: none this round)" if entry.get("evaluated") is False else ""
    log.info("eta %g round %d: mean task score %.4f%s, %.1fs", eta, entry["round"], entry["mean_task_score"],
             carried, entry["time_s"])


def eta_run(eta: float, rounds: list[dict], val: dict[int, dict]) -> dict:
    """One eta's run: its rounds and its clients' local-validation metrics, with their mean score."""
    return dict(eta=eta, rounds=rounds, val=val, val_score=float(np.mean([v["score"] for v in val.values()])))


SHARED_RULE = "one eta for all: the best mean local-validation score of the clients' task metric (smaller eta on ties)"
PER_CLIENT_RULE = ("each client keeps the eta whose run has its best own local-validation score (smaller eta on ties); "
                   "no extra training")


def select_eta(runs: list[dict]) -> tuple[dict, dict | None]:
    """The run whose eta has the best mean local-validation score (the smaller eta on ties), and the
    sweep report when more than one eta ran."""
    chosen = max(runs, key=lambda run: (run["val_score"], -run["eta"]))  # the smaller eta on ties, in any grid order
    if len(runs) == 1:
        return chosen, None
    last = [run["rounds"][-1] for run in runs]
    return chosen, dict(grid=[run["eta"] for run in runs], val_scores=[run["val_score"] for run in runs],
                        test_scores=[r["mean_task_score"] for r in last],
                        personal_test_scores=[r.get("mean_personal_task_score") for r in last],
                        selected_eta=chosen["eta"], selection=SHARED_RULE)


def select_eta_per_client(runs: list[dict]) -> dict[int, dict]:
    """Per client, the run whose eta gives that client its best own local-validation score (the smaller
    eta on ties). Reads `val` only: each eta's run is already trained, so this costs nothing. A client with no
    validation score in a run (missing from a Flower round at the end) never has that run chosen for it."""
    def own_score(run: dict, cid: int) -> float:
        score = run["val"].get(cid, {}).get("score")
        return -math.inf if score is None else score

    clients = dict.fromkeys(cid for run in runs for cid in run["val"])
    return {cid: max(runs, key=lambda run: (own_score(run, cid), -run["eta"])) for cid in clients}


def warn_infeasible(cfg: RunConfig, plan) -> None:
    """Say loudly, in the log and on stderr, which clients the memory estimate says cannot train."""
    for cid, info in plan.phase2["clients"].items():
        if not info["feasible"]:
            need = info["memory_estimate_bytes"]["total_estimate"] / 2**30
            msg = (f"warning: client {cid} ({info['device']}, {info['memory_budget_bytes'] / 2**30:.0f} GiB) cannot "
                   f"train {cfg.model} by the memory estimate ({need:.1f} GiB); it is trained in this simulation "
                   "and flagged infeasible in the result JSON")
            log.warning(msg)
            print(msg, file=sys.stderr)


def ambiguity_warning(phase1: dict | None) -> str | None:
    """One line saying that phase 1's split test finds the next larger k also fits (docs/clustering.md), or None."""
    if not phase1 or not phase1.get("ambiguous"):
        return None
    k, split = phase1["k"], phase1["split"]
    return (f"warning: phase 1 is ambiguous: k = {k} passed its bar, but k = {split['k_next']} also fits (split "
            f"test G = {split['statistic']:.2f} above {split['threshold']:.2f}); margin {phase1['margin']:.3f}. "
            "Two tasks may share a cluster (docs/clustering.md)")


def warn_ambiguous(plan) -> None:
    """Say in the log and on stderr when phase 1's partition is ambiguous."""
    msg = ambiguity_warning(plan.phase1)
    if msg:
        log.warning(msg)
        print(msg, file=sys.stderr)


# ---- divergence --------------------------------------------------------------------------------
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_RULE = ("a client has diverged when its mean training loss in some round is not finite, or exceeds "
                   f"{DIVERGENCE_FACTOR:g} x the smaller of its first-round loss and ln(number of labels) (the loss "
                   "of a uniform guess, where every fresh head starts)")


def divergence(rounds: list[dict], num_labels: dict[str, int]) -> dict[int, dict]:
    """The clients that diverged (DIVERGENCE_RULE), each with the first round it happened in, that round's
    training loss and the limit it crossed. The ln(labels) term catches a run that blows up within its first
    round (e.g. --lr 1000: round-1 losses in the thousands), which a limit relative to round 1 alone would miss."""
    if not rounds:
        return {}
    first: dict[int, float] = {}  # each client's first training loss (a client that is not sampled has none)
    found: dict[int, dict] = {}
    for entry in rounds:
        for c in entry["clients"]:
            cid, loss = c["client_id"], c["train_loss"]
            if cid in found or loss is None:
                continue
            first.setdefault(cid, loss)
            chance = math.log(max(num_labels[c["task"]], 2))
            reference = min(first[cid], chance) if math.isfinite(first[cid]) else chance
            limit = DIVERGENCE_FACTOR * reference
            if not math.isfinite(loss) or loss > limit:
                found[cid] = dict(round=entry["round"], train_loss=loss, limit=limit, task=c["task"])
    return found


def warn_diverged(eta: float, rounds: list[dict], num_labels: dict[str, int]) -> None:
    """After each round: say loudly, in the log and on stderr, which clients diverged in this round."""
    for cid, info in divergence(rounds, num_labels).items():
        if info["round"] != rounds[-1]["round"]:
            continue
        msg = (f"warning: client {cid} ({info['task']}) diverged in round {info['round']} (eta {eta:g}): training "
               f"loss {info['train_loss']:.4g} > {info['limit']:.3g} ({DIVERGENCE_FACTOR:g} x the smaller of its "
               "first-round loss and ln(labels)); lower --lr. It is flagged `diverged` in the result JSON")
        log.warning(msg)
        print(msg, file=sys.stderr)
