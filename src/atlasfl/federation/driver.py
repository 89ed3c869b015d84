"""The one federation loop, whatever carries it: plan or restore, every eta of the method's grid, the rounds,
checkpoints, round records and the per-round callbacks (log line, divergence, missing clients, live curves),
then the result. An engine is a `Transport` under it: it moves work to the clients and their results back,
and says who replied and who failed; the in-process engine and the Flower ServerApp run this same loop."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from atlasfl.config import RunConfig
from atlasfl.errors import AtlasError
from atlasfl.federation.records import (
    client_round,
    eta_run,
    kept_round,
    log_round,
    round_cost,
    round_summary,
    warn_ambiguous,
    warn_diverged,
    warn_infeasible,
    warn_missing,
)
from atlasfl.federation.replies import Spec, check_replies, upload_spec
from atlasfl.federation.server import Plan, Server, TooFewReplies
from atlasfl.federation.transport import Offered, Roster, Transport
from atlasfl.methods import Method, method_for
from atlasfl.models.lora import head_has_bias, state_digest
from atlasfl.results.build import build_result
from atlasfl.results.checkpoint import (
    checkpoint_label,
    checkpoint_payload,
    clear_checkpoints,
    latest_checkpoint,
    restore_rng,
    restored_runs,
    save_checkpoint,
)
from atlasfl.tracking import open_tracker

log = logging.getLogger("atlasfl")


@dataclass
class Federation:
    """One run under way: its config, method, transport, server and plan, its eta's rounds so far, the finished
    etas' runs and the seconds of its phases."""

    cfg: RunConfig
    method: Method
    transport: Transport
    server: Server
    plan: Plan
    roster: Roster
    phases_s: dict[str, float] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    val: dict[int, dict] = field(default_factory=dict)
    on_round: Callable[[int, dict[int, dict]], None] | None = None
    expected: dict[int, Spec] = field(default_factory=dict)  # each client's upload keys and shapes, by the plan

    def __post_init__(self):
        facts = self.roster.facts
        labels = {s.client_id: self.roster.tasks[s.task].num_labels for s in self.roster.shards}
        self.expected = {cid: upload_spec(self.plan.ranks[cid], self.roster.shapes, labels[cid], facts.hidden_size,
                                          head_bias=head_has_bias(facts.family), parts=self.method.uploads)
                         for cid in labels}


def run(cfg: RunConfig, transport: Transport, *, resume: bool = False, progress: bool = False,
        on_round: Callable[[int, dict[int, dict]], None] | None = None) -> dict:
    """One federated experiment end to end over `transport`; returns its result dictionary.

    A checkpoint is written after planning and after every round; with `resume` the run continues from the
    newest complete one and ends with the same result as an uninterrupted run. `on_round(round, val)`, if given,
    receives every round's local-validation scores after its checkpoint (a tuner's pruning): the clients then
    validate every round instead of after the last only, which changes no state and no result."""
    t_start = time.perf_counter()
    method = method_for(cfg)
    etas = method.etas()
    tracker = open_tracker(cfg, etas)  # before any work: a missing tensorboard package fails fast
    checkpoint = latest_checkpoint(cfg) if resume else None
    fed = plan_or_restore(cfg, method, transport, checkpoint)
    fed.on_round = on_round
    setup_s = time.perf_counter() - t_start
    start_eta, start_round = 0, 0
    if checkpoint is None:
        clear_checkpoints(cfg.checkpoint_path)  # a fresh start must not mix with an older attempt's rounds
        save(fed, 0, 0)
    else:
        meta, states = checkpoint
        restore_rng(meta["rng"])
        fed.runs, start_eta, start_round = restored_runs(meta), meta["eta_index"], meta["round"]
        print(f"resuming {cfg.run_name} from {checkpoint_label(meta)}", file=sys.stderr)
    try:
        with RunProgress(progress) as bars:
            for eta_index in range(start_eta, len(etas)):
                eta = etas[eta_index]
                if checkpoint is not None and eta_index == start_eta:
                    fed.rounds, fed.val = meta["rounds"], {int(c): v for c, v in meta["val"].items()}
                    saved = _unprefixed("optimizer/", meta["server_tensors"])
                    fed.server.start_eta(eta, saved if start_round > 0 else None)
                    transport.start_eta(eta, states if start_round > 0 else None)
                    tracker.resume(eta, fed.rounds)
                else:
                    start_round, fed.rounds, fed.val = 0, [], {}
                    fed.server.start_eta(eta)
                    transport.start_eta(eta, None)
                bars.start_rounds(f"rounds (eta={eta:g})" if len(etas) > 1 else "rounds", cfg.rounds, start_round)
                for r in range(start_round + 1, cfg.rounds + 1):
                    fed.rounds.append(run_round(fed, r, bars))
                    log_round(eta, fed.rounds[-1])
                    warn_diverged(eta, fed.rounds, {n: t.num_labels for n, t in fed.roster.tasks.items()})
                    fed.rounds[-1]["cost"]["checkpoint_s"] = save(fed, eta_index, r)
                    tracker.round(eta, fed.rounds[-1], fed.phases_s)
                    bars.advance()
                    if on_round is not None:
                        on_round(r, dict(fed.val))
                transport.eta_done(eta_index)
                fed.runs.append(eta_run(eta, fed.rounds, dict(fed.val)))
    except AtlasError as exc:
        raise AtlasError(f"{exc}: the run stops; its last checkpoint is kept in {cfg.checkpoint_path} "
                         f"({transport.stop_hint})") from None
    finally:
        tracker.close()
    result = build_result(cfg, fed.roster.shards, fed.roster.tasks, fed.plan, fed.runs, setup_s, fed.phases_s,
                          time.perf_counter() - t_start, transport.device, clock_note=transport.clock_note,
                          client_refs=fed.roster.references)
    transport.finish(result, fed.runs)
    return result


def plan_or_restore(cfg: RunConfig, method: Method, transport: Transport, checkpoint: tuple | None) -> Federation:
    """Phases 1-2 (fingerprints, clusters, devices, ranks), or the plan a checkpoint holds; then every client's
    adapter is built at its planned ranks."""
    phases_s = {}
    if checkpoint is None:
        t0 = time.perf_counter()
        roster, uploads = transport.fingerprint()
        phases_s["fingerprint"] = time.perf_counter() - t0
        server = _server(cfg, method, roster)
        plan = server.plan(uploads)
    else:
        roster = transport.restore(checkpoint[0])
        server = _server(cfg, method, roster)
        plan = Plan.from_json(checkpoint[0]["plan"])
        server.adopt(plan)
        method.restore_clustering(checkpoint[0].get("clustering", {}),
                                  _unprefixed("clustering/", checkpoint[0]["server_tensors"]))
    warn_infeasible(cfg, plan)
    warn_ambiguous(plan)
    log.info("%s: %d clients on %s, model %s, clusters %s (%s), groups %s", cfg.run_name, len(roster.shards),
             ", ".join(roster.tasks), cfg.model, plan.cluster_labels, plan.cluster_source, server.groups())
    transport.build(plan)
    return Federation(cfg, method, transport, server, plan, roster, phases_s)


def _server(cfg: RunConfig, method: Method, roster: Roster) -> Server:
    return Server(cfg, method, roster.clients(), modules=roster.modules, shapes=roster.shapes, facts=roster.facts)


def run_round(fed: Federation, r: int, bars: RunProgress) -> dict:
    """One round: every client trains, the server aggregates each sharing group over its replying members and
    sends the new states, every client that trained is tested. A client that fails is left out of the round: it
    keeps its last state and its last metrics, labelled as such. The entry carries its `cost`."""
    t0 = time.perf_counter()
    bars.start_clients(len(fed.roster.shards))
    # The clients' states before training (`Method.regroup`); none before round 1: the initial states stay with
    # the clients (a Flower server never holds them), so both engines give a method the same view.
    starts = dict(fed.transport.states()) if r > 1 else {}
    trained = fed.transport.train(r, set(fed.server.sharing_clients()), bars.advance_clients)
    _reject_bad_replies(fed, trained)
    t_train = time.perf_counter()
    warn_missing(r, trained.missing)
    _check_missing(fed, trained.missing)
    down = fed.transport.deliver(fed.server.aggregate(trained.uploads, frozenset(trained.missing)), r)
    fed.server.regroup(r, trained.uploads, starts)
    offered = _offer(fed, r, set(trained.missing))
    t_aggregate = time.perf_counter()
    evaluated = fed.transport.evaluate(r, set(trained.losses) - set(trained.missing),
                                       validate=r == fed.cfg.rounds or fed.on_round is not None)
    t_end = time.perf_counter()
    warn_missing(r, evaluated.missing)
    missing = {**trained.missing, **offered.missing, **evaluated.missing}
    _check_missing(fed, missing)
    fed.val.update(evaluated.val)
    clients = []
    for s in fed.roster.shards:
        cid = s.client_id
        up = trained.bytes_up.get(cid, 0) + offered.bytes_up.get(cid, 0)
        sent = down.get(cid, 0) + offered.bytes_down.get(cid, 0)
        clients.append(kept_round(fed.rounds, cid, up, sent) if cid in missing else
                       client_round(cid, s.task, trained.losses[cid], evaluated.tests[cid], up, sent))
    clients_s = (None if trained.clients_s is None else
                 dict(train=trained.clients_s, evaluate=evaluated.clients_s or 0.0))
    cost = round_cost(train_s=t_train - t0, aggregate_s=t_aggregate - t_train, evaluate_s=t_end - t_aggregate,
                      work=dict(train=trained.work, evaluate=evaluated.work), clients_s=clients_s)
    digests = {str(c): state_digest(st) for c, st in sorted(fed.transport.states().items())}
    return round_summary(r, clients, list(fed.roster.tasks), t_end - t0, digests,
                         eta=fed.server.eta if fed.method.personalises else None, cost=cost,
                         missing={str(c): why for c, why in sorted(missing.items())},
                         clusters=fed.server.round_clusters())


def _reject_bad_replies(fed: Federation, trained) -> None:
    """Leave out of the round, as failed clients, those whose replies fail `replies.check_replies`; the transport
    puts each back to its state before the round."""
    trained.uploads, rejected = check_replies(trained.uploads, fed.expected, fed.server.sharing_groups(),
                                              fed.cfg.reply_norm_bound)
    if rejected:
        fed.transport.reject(set(rejected))
        trained.missing.update(rejected)


def _offer(fed: Federation, r: int, missing: set[int]) -> Offered:
    """The candidate states a method offers after aggregation (ifca's k models), each client's adopted choice
    told to the server; nothing when the method offers none."""
    candidates = fed.server.offers(missing)
    if candidates is None:
        return Offered()
    offered = fed.transport.offer(r, candidates)
    warn_missing(r, offered.missing)
    fed.server.chose(offered.choices)
    return offered


def _check_missing(fed: Federation, missing: dict[int, str]) -> None:
    """Stop (the last checkpoint kept) when nobody replied, or when a missing client has no earlier round of
    this eta whose state and metrics it could keep."""
    if len(missing) == len(fed.roster.shards):
        raise TooFewReplies(group=sorted(missing), missing=sorted(missing), needed=1)
    if missing and not fed.rounds:
        raise AtlasError(f"client(s) {sorted(missing)} failed in the first round of eta {fed.server.eta:g}, before "
                         "any state or metrics of theirs existed to keep")


def save(fed: Federation, eta_index: int, round_idx: int) -> float:
    """Checkpoint the run; its seconds add up in phases_s['checkpoint'] and are returned, its size goes to the
    log. (The saved copy of the round's cost has no checkpoint seconds yet: they are being measured.)"""
    t0 = time.perf_counter()
    states = fed.transport.states()
    clustering, clustering_tensors = fed.method.clustering_state()
    server_tensors = {**_prefixed("optimizer/", fed.server.optimizer_state()),
                      **_prefixed("clustering/", clustering_tensors)}
    payload = checkpoint_payload(fed.cfg, fed.plan, fed.rounds, fed.runs, states, clustering=clustering,
                                 val={str(c): v for c, v in fed.val.items()}, **fed.transport.checkpoint_extra())
    folder = save_checkpoint(fed.cfg.checkpoint_path, eta_index=eta_index, round_idx=round_idx, states=states,
                             payload=payload, keep=fed.cfg.keep_checkpoints, server_tensors=server_tensors)
    seconds = time.perf_counter() - t0
    fed.phases_s["checkpoint"] = fed.phases_s.get("checkpoint", 0.0) + seconds
    log.info("checkpoint %s: %.2fs, %.2f MB", folder.name, seconds,
             sum(f.stat().st_size for f in folder.iterdir()) / 1e6)
    return seconds


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + key: t for key, t in tensors.items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    """The tensors of `server_tensors` saved under `prefix`, by their own names."""
    return {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}


class RunProgress:
    """Progress bars on the rounds of the current eta and on the clients of the current round; silent when
    disabled."""

    def __init__(self, enabled: bool):
        from rich.progress import Progress

        self.bar = Progress(transient=False) if enabled else None
        self.rounds = self.clients = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def start_rounds(self, label: str, total: int, done: int) -> None:
        if self.bar is not None:
            self.rounds = self.bar.add_task(label, total=total, completed=done)

    def start_clients(self, total: int) -> None:
        if self.bar is not None:
            if self.clients is None:
                self.clients = self.bar.add_task("clients", total=total)
            self.bar.reset(self.clients, total=total)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.rounds)

    def advance_clients(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.clients, steps)
