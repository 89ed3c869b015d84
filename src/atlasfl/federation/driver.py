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
from atlasfl.federation.cohort import FAILED, TRAINED, client_seconds, participation, payload_sizes
from atlasfl.federation.privacy import privacy_block, round_privacy
from atlasfl.federation.records import (
    client_round,
    eta_run,
    is_test_round,
    kept_round,
    log_round,
    round_cost,
    round_summary,
    untested_round,
    warn_ambiguous,
    warn_diverged,
    warn_infeasible,
    warn_missing,
)
from atlasfl.federation.replies import check_replies
from atlasfl.federation.server import Plan, Server, TooFewReplies
from atlasfl.federation.transport import CaughtUp, Offered, Roster, Transport
from atlasfl.federation.wire import WIRE_DTYPES
from atlasfl.methods import Method, method_for
from atlasfl.models.lora import state_digest
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
    start_eta, start_round, stopped = 0, 0, False
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
                    clips = _unprefixed("dpclip/", meta["server_tensors"])
                    missed = _unprefixed("missed/", meta["server_tensors"])
                    fed.server.start_eta(eta, saved if start_round > 0 else None, done=start_round,
                                         clip_state=clips if start_round > 0 else None,
                                         missed_state=missed if start_round > 0 else None)
                    transport.start_eta(eta, states if start_round > 0 else None)
                    tracker.resume(eta, fed.rounds)
                else:
                    start_round, fed.rounds, fed.val = 0, [], {}
                    fed.server.start_eta(eta)
                    transport.start_eta(eta, None)
                bars.start_rounds(f"rounds (eta={eta:g})" if len(etas) > 1 else "rounds", cfg.rounds, start_round)
                for r in range(start_round + 1, cfg.rounds + 1):
                    if stop_for_budget(fed, r):
                        stopped = True
                        break
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
                if stopped:
                    break
    except AtlasError as exc:
        raise AtlasError(f"{exc}: the run stops; its last checkpoint is kept in {cfg.checkpoint_path} "
                         f"({transport.stop_hint})") from None
    finally:
        tracker.close()
    result = build_result(cfg, fed.roster.shards, fed.roster.tasks, fed.plan, fed.runs, setup_s, fed.phases_s,
                          time.perf_counter() - t_start, transport.device, clock_note=transport.clock_note,
                          client_refs=fed.roster.references,
                          privacy=privacy_block(cfg, fed.runs[-1]["rounds"], stopped))
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
    """One round: the round's participants (`cohort.participation`: every client unless sampling or the simulated
    clock leaves some out) catch up on what their groups aggregated while they were away (`_catch_up`) and train,
    the server aggregates each sharing group over its replying participants and sends them their new states, and
    the participants are tested (in the rounds `records.is_test_round` says). A client that fails is left out of
    the round: it keeps its last state and its last metrics, labelled as such; so does a client that does not take
    part (labelled with why), except that in an eta's first round and when the clients validate, every client that
    did not fail is asked, caught up first, so each one's metrics are always those of the state it holds
    (docs/scale.md). The entry carries its `cost` and its `simulated` clock."""
    t0 = time.perf_counter()
    clients_all = [s.client_id for s in fed.roster.shards]
    sharing = set(fed.server.sharing_clients())
    part = participation(fed.cfg, r, clients_all, _seconds_of(fed, sharing))
    before = _catch_up(fed, r, set(part.participants), r - 1)  # what they missed, before they train from it
    took_part = set(part.participants) - set(before.missing)
    bars.start_clients(len(took_part))
    # The participants' states before training (`Method.regroup`), of those that have trained in this eta: the
    # initial states stay with the clients (a Flower server never holds them), so both engines give a method the
    # same view.
    held = {c for e in fed.rounds for c in _participants(e)}
    starts = fed.transport.states(held & took_part)
    trained = fed.transport.train(r, took_part, sharing & took_part, bars.advance_clients,
                                  clips=fed.server.clips_for(sharing & took_part))
    _reject_bad_replies(fed, trained)
    t_train = time.perf_counter()
    warn_missing(r, trained.missing)
    failed = {**before.missing, **trained.missing}
    _check_missing(fed, failed)
    absent = frozenset(part.left_out)
    down = fed.transport.deliver(fed.server.aggregate(trained.uploads, frozenset(failed), absent, r,
                                                      trained.within_clip), r)
    fed.server.regroup(r, trained.uploads, starts)
    offered = _offer(fed, r, set(clients_all) - set(failed) - absent)
    t_aggregate = time.perf_counter()
    last = r == fed.cfg.rounds or over_budget(fed, r + 1)  # the run's last round: its final scores
    validate = last or fed.on_round is not None
    test = last or is_test_round(fed.cfg, r)
    asked = set(clients_all if validate or not fed.rounds else trained.losses) - set(failed) - set(offered.missing)
    after = _catch_up(fed, r, asked, r)  # a client is tested on what it would hold had it taken part
    evaluated = fed.transport.evaluate(r, asked - set(after.missing), validate=validate, test=test)
    t_end = time.perf_counter()
    warn_missing(r, evaluated.missing)
    missing = {**failed, **offered.missing, **after.missing, **evaluated.missing}
    _check_missing(fed, missing)
    fed.val.update(evaluated.val)
    clients = []
    for s in fed.roster.shards:
        cid = s.client_id
        up = (trained.bytes_up.get(cid, 0) + offered.bytes_up.get(cid, 0) + before.bytes_up.get(cid, 0)
              + after.bytes_up.get(cid, 0))
        sent = (down.get(cid, 0) + offered.bytes_down.get(cid, 0) + before.bytes_down.get(cid, 0)
                + after.bytes_down.get(cid, 0))
        how = FAILED if cid in missing else part.left_out.get(cid, TRAINED)
        if cid not in missing and cid in evaluated.tests:
            entry = client_round(cid, s.task, trained.losses.get(cid), evaluated.tests[cid], up, sent)
        elif cid not in missing and cid in trained.losses:  # trained in a round without a test (--eval-every)
            entry = untested_round(fed.rounds, cid, trained.losses[cid], up, sent)
        else:
            entry = kept_round(fed.rounds, cid, up, sent)
        clients.append(dict(entry, participation=how, simulated_s=part.seconds.get(cid),
                            **({"missing": True} if cid in missing else {})))
    clients_s = (None if trained.clients_s is None else
                 dict(train=trained.clients_s, evaluate=evaluated.clients_s or 0.0))
    cost = round_cost(train_s=t_train - t0, aggregate_s=t_aggregate - t_train, evaluate_s=t_end - t_aggregate,
                      work=dict(train=trained.work, evaluate=evaluated.work), clients_s=clients_s)
    participants = sorted(took_part - set(missing))
    held |= set(participants)  # the states the server knows
    digests = {str(c): state_digest(st) for c, st in sorted(fed.transport.states(held).items())}
    return round_summary(r, clients, list(fed.roster.tasks), t_end - t0, digests,
                         eta=fed.server.eta if fed.method.personalises else None, cost=cost,
                         missing={str(c): why for c, why in sorted(missing.items())},
                         clusters=fed.server.round_clusters(), tested=test, participants=participants,
                         simulated=part.record(),
                         privacy=round_privacy(fed.cfg, _rates(fed, r), fed.server.round_clips),
                         caught_up=sorted((set(before.bytes_down) | set(after.bytes_down)) - set(missing)))


def _participants(entry: dict) -> list[int]:
    """A round entry's participants (an entry checkpointed before client sampling: every client that replied)."""
    return entry.get("participants", [c["client_id"] for c in entry["clients"] if not c.get("missing")])


def _seconds_of(fed: Federation, sharing: set[int]) -> Callable[[int], float]:
    """Each client's simulated seconds this round (`cohort.client_seconds`): its training tokens (its shard's, once
    per local epoch, twice with a personal copy), what it sends and receives if it shares this round, and what it
    is owed from the rounds it took no part in (`Server.missed`)."""
    cfg, method, facts = fed.cfg, fed.method, fed.roster.facts
    passes = sum(epochs for _, epochs in method.local_phases()) * (2 if method.keeps_personal else 1)
    itemsize = WIRE_DTYPES[cfg.wire_dtype].itemsize

    def seconds(cid: int) -> float:
        labels = fed.server.clients[cid].num_labels
        shares = cid in sharing
        return client_seconds(device=fed.plan.devices[cid], params=facts.total_params,
                              tokens=passes * fed.roster.train_tokens[cid],
                              sizes=payload_sizes(fed.plan.ranks[cid], fed.roster.shapes,
                                                  facts.hidden_size * labels + labels),
                              uploads=method.uploads if shares else (), downloads=method.downloads if shares else (),
                              itemsize=itemsize, missed=sum(t.numel() for _, state in fed.server.missed.get(cid, [])
                                                           for t in state.values()))
    return seconds


def _rates(fed: Federation, r: int) -> list[float]:
    """Each round's client participation rate up to round `r` for the accountant: 1 (every client is asked to
    train each round; a client sampler will record its own rate, and `Server.participation_rate` says so)."""
    return [fed.server.participation_rate()] * r


def over_budget(fed: Federation, r: int) -> bool:
    """Whether round `r` would bring the ε spent past `--dp-epsilon-budget` (False without one)."""
    budget = fed.cfg.dp_epsilon_budget
    if budget is None:
        return False
    spent = round_privacy(fed.cfg, _rates(fed, r))
    return spent["epsilon_infinite"] or spent["epsilon"] > budget


def stop_for_budget(fed: Federation, r: int) -> bool:
    """Whether the run stops before round `r` for its budget (logged); a budget that not even round 1 fits stops
    it with an error."""
    if not over_budget(fed, r):
        return False
    if r == 1:
        raise AtlasError(f"--dp-epsilon-budget {fed.cfg.dp_epsilon_budget:g} does not cover one round; raise it, or "
                         "--dp-noise")
    log.warning("round %d would spend more epsilon than --dp-epsilon-budget %g: the run stops after round %d", r,
                fed.cfg.dp_epsilon_budget, r - 1)
    return True


def _catch_up(fed: Federation, r: int, clients: set[int], last_offer: int) -> CaughtUp:
    """Bring those of `clients` that took no part in earlier rounds up to date before they train or are tested:
    send each what its group aggregated meanwhile (`Method.catch_up`), and offer the method's current models to
    each that did not adopt the offer of round `last_offer` (`Method.behind`: ifca). A client that fails to take
    them keeps its state, and what it missed stays queued."""
    missed = fed.server.take_missed(clients)
    caught = fed.transport.catch_up(missed) if missed else CaughtUp()
    fed.server.give_back_missed({c: missed[c] for c in caught.missing})
    warn_missing(r, caught.missing)
    behind = fed.method.behind(clients - set(caught.missing), last_offer)
    if behind:
        offered = _offer(fed, r, behind)
        caught.missing.update(offered.missing)
        for mine, theirs in ((caught.bytes_down, offered.bytes_down), (caught.bytes_up, offered.bytes_up)):
            for c, nbytes in theirs.items():
                mine[c] = mine.get(c, 0) + nbytes
    return caught


def _reject_bad_replies(fed: Federation, trained) -> None:
    """Leave out of the round, as failed clients, those whose replies fail `replies.check_replies`; the transport
    puts each back to its state before the round."""
    trained.uploads, rejected = check_replies(trained.uploads, fed.server.expected, fed.server.sharing_groups(),
                                              fed.cfg.reply_norm_bound)
    if rejected:
        fed.transport.reject(set(rejected))
        trained.missing.update(rejected)


def _offer(fed: Federation, r: int, clients: set[int]) -> Offered:
    """The candidate states a method offers `clients` (ifca's k models), each client's adopted choice told to the
    server; nothing when the method offers none."""
    candidates = fed.server.offers(clients)
    if candidates is None:
        return Offered()
    offered = fed.transport.offer(r, candidates)
    warn_missing(r, offered.missing)
    fed.server.chose(offered.choices, r)
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
                      **_prefixed("dpclip/", fed.server.clip_state()),
                      **_prefixed("missed/", fed.server.missed_tensors()),
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
