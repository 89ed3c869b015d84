"""The ATLAS Flower strategy: drives `federation.server.Server` over a Flower grid.

Before round 1 the strategy queries every node for its fingerprint (phase 1) and plans clusters,
devices and ranks with `Server.plan` (phase 2); round 1's messages bring each client its ranks. Each round is then
Flower's train/evaluate cycle: the train replies of the clients that share this round
(`Server.sharing_clients`; a client alone in its group, or any client at η = 0, sends nothing) carry their
trained states, which `Server.aggregate` turns into one new state per sharing client (cluster mean, or the
Laplacian step); the evaluate messages carry each of them its new state, at its own ranks, and return
every client's test metrics.
The result dictionary is built by the same `results.build.build_result` as the in-process engine's.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from atlasfl.config import RunConfig
from atlasfl.data.batching import Tally
from atlasfl.data.tasks import TaskData, expand_tasks, task_metric
from atlasfl.engines.flower.records import (
    ATLAS,
    BACKUP,
    RESTORE,
    STATE,
    TRANSPORT,
    config_to_json,
    plain_record,
    plain_state,
    record_to_state,
    state_to_record,
)
from atlasfl.errors import AtlasError
from atlasfl.federation.methods import METHOD_SPECS
from atlasfl.federation.records import (
    client_round,
    eta_grid,
    eta_run,
    log_round,
    num_clients,
    round_cost,
    round_summary,
    warn_diverged,
    warn_infeasible,
)
from atlasfl.federation.server import ClientInfo, Plan, Server, TooFewReplies
from atlasfl.models.lora import state_digest
from atlasfl.phases.devices import ModelFacts
from atlasfl.phases.fingerprint import LABEL_KEYS, NOISE_KEYS
from atlasfl.results.build import build_result
from atlasfl.results.checkpoint import (
    checkpoint_label,
    checkpoint_payload,
    clear_checkpoints,
    latest_checkpoint,
    restored_runs,
    save_checkpoint,
)
from atlasfl.tracking import Tracker, open_tracker

log = logging.getLogger("atlasfl")
CONNECT_TIMEOUT_S = 300.0  # how long the ServerApp waits for every SuperNode to connect
# Per message round. A killed SuperNode stops heartbeating and the SuperLink answers for it with an error
# within 2 x its 30 s heartbeat interval; this bounds only a node that is alive but silent.
REPLY_TIMEOUT_S = 3600.0
# Waits between checks for replies: the first, and the longest it grows to (x1.5 per check).
REPLY_POLL_S = (0.05, 1.0)
CLOCK_NOTE = ("flower: train_s/aggregate_s/evaluate_s are the ServerApp's wall clock from sending a phase's messages "
              "to holding all replies (so they include transport and ClientApp start-up); clients_s sums the seconds "
              "the clients measured inside local training and test evaluation; work (examples, tokens) is what the "
              "clients counted; every client evaluates (no sharing of identical states); checkpoint: the ServerApp "
              "writing its copy of the clients' states")


@dataclass(frozen=True)
class RemoteShard:
    """What the server knows of a client's data: its task and sizes (the examples stay on the node)."""
    client_id: int
    task: str
    train: range
    val: range


class AtlasStrategy(Strategy):
    """One run of ATLAS over a Flower grid. The clients' states live on the nodes between rounds; the
    server keeps an exact copy of each (`states`: what it sent, or the client's BACKUP) for its checkpoints
    and for a node that lost its own."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.method = METHOD_SPECS[cfg.method]
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.synced: set[int] = set()  # clients whose node holds the run config, ranks and the server's copy
        self.online: set[int] = set()  # node ids online at the start of the current round
        self.server: Server | None = None
        self.plan: Plan | None = None
        self.shards: list[RemoteShard] = []
        self.infos: dict[int, dict] = {}
        self.eta = cfg.eta
        self.reports = _Reports()
        self.tracker = Tracker()  # live curves (--tensorboard), from this server process
        self.phases_s: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        """Fresh per-eta bookkeeping (a lambda sweep restarts every client from its initial state)."""
        self.rounds: list[dict] = []
        self.val: dict[int, dict] = {}
        self.pending: dict[int, ArrayRecord] = {}
        self.states: dict[int, dict] = {}  # client id -> its state after the last round (absent: its initial one)
        self._round: dict = {}

    # ---- phases 1 and 2 --------------------------------------------------------------------------
    def prepare(self, grid: Grid) -> dict[str, float]:
        """Fingerprint query and `Server.plan` (the ranks go out with round 1). Returns the phase's time."""
        expected = num_clients(self.cfg)
        nodes = _wait_for_nodes(grid, expected)
        t0 = time.perf_counter()
        config = ConfigRecord({"config": config_to_json(self.cfg)})
        replies = _exchange(grid, [_message(RecordDict({ATLAS: config}), n, MessageType.QUERY + ".fingerprint")
                                   for n in nodes], "fingerprint")
        uploads = {}
        for reply in replies:
            info = json.loads(reply.content[ATLAS]["client"])
            cid = info["client_id"]
            if cid in self.infos:
                raise AtlasError(f"two SuperNodes claim partition-id {cid}; give each node its own partition-id")
            self.infos[cid], self.node_of[cid] = info, reply.metadata.src_node_id
            fp = reply.content["fingerprint"]
            uploads[cid] = dict(representation=fp["representation"].numpy(), gradient=fp["gradient"].numpy(),
                                **{key: float(fp[key].numpy()[0]) for key in NOISE_KEYS},
                                **{key: fp[key].numpy() for key in LABEL_KEYS},
                                importance=dict(zip(info["modules"], fp["importance"].numpy().tolist())))
            self.reports.add("fingerprint", cid, reply)
        fingerprint_s = time.perf_counter() - t0
        if sorted(self.infos) != list(range(expected)):
            raise AtlasError(f"SuperNodes hold partition-ids {sorted(self.infos)}, the run needs 0..{expected - 1}")
        self._set_up_server()
        self.plan = self.server.plan(uploads)
        self.synced = set(self.infos)
        warn_infeasible(self.cfg, self.plan)
        log.info("%s over Flower: clusters %s, groups %s", self.cfg.run_name, self.plan.cluster_labels,
                 self.server.groups())
        return dict(fingerprint=fingerprint_s)

    def _set_up_server(self) -> None:
        """The transport-free server and what the result needs of the clients, from their fingerprint replies."""
        infos, first = self.infos, self.infos[0]
        self.shards = [RemoteShard(c, infos[c]["task"], range(infos[c]["num_train"]), range(infos[c]["num_val"]))
                       for c in sorted(infos)]
        self.tasks = {name: TaskData(name, next(i["num_labels"] for i in infos.values() if i["task"] == name),
                                     task_metric(name), [], []) for name in expand_tasks(self.cfg.tasks)}
        clients = [ClientInfo(c, i["task"], i["num_train"], i["num_labels"]) for c, i in sorted(infos.items())]
        self.server = Server(self.cfg, clients, modules=first["modules"], facts=ModelFacts(**first["facts"]),
                             shapes={m: tuple(s) for m, s in first["shapes"].items()})

    def _restore(self, grid: Grid, meta: dict, states: dict[int, dict]) -> tuple[list[dict], int, int]:
        """Continue from a checkpoint: the plan, the rounds so far and the server's copies of the clients'
        states; the nodes (new ones in a new run) are identified and get their state with their next message."""
        own = meta["flower"]
        self.infos = {int(c): i for c, i in own["infos"].items()}
        self._set_up_server()
        self.plan = Plan.from_json(meta["plan"])
        self.server.adopt(self.plan)
        self.rounds, self.states = meta["rounds"], states
        self.val = {int(c): v for c, v in own["val"].items()}
        self.reports = _Reports.from_json(own["reports"])
        _wait_for_nodes(grid, len(self.infos))
        print(f"resuming {self.cfg.run_name} from {checkpoint_label(meta)}", file=sys.stderr)
        return restored_runs(meta), meta["eta_index"], meta["round"]

    def _refresh_nodes(self, grid: Grid) -> None:
        """Note which nodes are online and identify the ones this run has not met (a restarted SuperNode
        registers as a new node): their client gets the run config, ranks and its state with its next message."""
        self.online = set(grid.get_node_ids())
        new = sorted(self.online - set(self.node_of.values()))
        if not new:
            return
        replies = send_and_receive(grid, [_message(RecordDict(), n, MessageType.QUERY + ".identify") for n in new])
        for reply in replies:
            if not reply.has_error():
                cid = int(reply.content[ATLAS]["client_id"])
                if cid in self.infos:
                    self.node_of[cid] = reply.metadata.src_node_id
                    self.synced.discard(cid)
                    log.info("client %d is on node %d", cid, reply.metadata.src_node_id)

    # ---- phases 3 and 4: Flower's round cycle ----------------------------------------------------
    def train_round(self, grid: Grid, server_round: int) -> None:
        """One round as Flower's Strategy.start runs it (train, aggregate, evaluate), with the nodes refreshed
        first and a client that fails or does not reply left out of the round instead of failing the run."""
        self._refresh_nodes(grid)
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        self.aggregate_train(server_round, self._sent(grid, messages))
        messages = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        self.aggregate_evaluate(server_round, self._sent(grid, messages))

    def _sent(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send and wait; the clients that send no reply, or an error (a killed SuperNode, an exception in the
        ClientApp), are noted missing from this round with Flower's reason."""
        replies = send_and_receive(grid, messages) if messages else []
        cid_of = {m.metadata.message_id: self._round["to"][m.metadata.dst_node_id] for m in messages}
        answered = set()
        for reply in replies:
            cid = cid_of.get(reply.metadata.reply_to_message_id)
            if reply.has_error():  # Flower's reason may hold a whole traceback: its last line says what failed
                self._miss(cid, reply.error.reason.strip().splitlines()[-1][-300:] or f"error {reply.error.code}")
            elif cid is not None:
                answered.add(cid)
        for cid in set(cid_of.values()) - answered:
            self._miss(cid, f"no reply within {REPLY_TIMEOUT_S:.0f}s")
        return [reply for reply in replies if not reply.has_error()]

    def _miss(self, cid: int | None, reason: str) -> None:
        """A client left out of this round: it keeps its last state; its node gets the server's copy back."""
        if cid is None or cid in self._round["missing"]:
            return
        self._round["missing"][cid] = reason
        self.synced.discard(cid)
        msg = f"warning: client {cid} is missing from round {self._round['round']} ({reason}); it keeps its last state"
        log.warning(msg)
        print(msg, file=sys.stderr)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = dict(t0=time.perf_counter(), round=server_round, losses={}, up={}, down={}, missing={}, to={},
                           work=dict(train=Tally(), evaluate=Tally()), clients_s=dict(train=0.0, evaluate=0.0))
        self.server.eta = self.eta
        sharing = set(self.server.sharing_clients())  # the others have nobody to share with: they upload nothing
        messages = []
        for cid in sorted(self.infos):
            node = self.node_of.get(cid)
            if node not in self.online:
                self._miss(cid, "its SuperNode is offline")
                continue
            conf = {"round": server_round, "reset": server_round == 1, "upload": cid in sharing}
            content = RecordDict()
            if server_round == 1 or cid not in self.synced:
                conf["ranks"] = json.dumps(self.plan.ranks[cid])
            if cid not in self.synced:
                conf["config"] = config_to_json(self.cfg)
                if server_round > 1:
                    content[RESTORE] = plain_record(self.states[cid])
            content[ATLAS] = ConfigRecord(conf)
            self._round["to"][node] = cid
            messages.append(_message(content, node, MessageType.TRAIN, group=server_round))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        uploads, r = {}, self._round
        r["t_train"] = time.perf_counter()
        for reply in replies:
            cid = int(reply.content[ATLAS]["client_id"])
            metrics = reply.content["metrics"]
            r["losses"][cid] = float(metrics["train_loss"])
            r["clients_s"]["train"] += float(metrics["train_s"])
            r["work"]["train"] += Tally(**{k: int(metrics[k]) for k in asdict(Tally())})
            if STATE in reply.content.array_records:
                uploads[cid] = record_to_state(reply.content[STATE], self.cfg.wire_dtype)
                r["up"][cid] = int(reply.content["metrics"]["bytes_up"])
            else:
                self.states[cid] = plain_state(reply.content[BACKUP])
            self.reports.add("rounds", cid, reply)
        self._check_replies()
        for cid, state in self.server.aggregate(uploads, frozenset(r["missing"])).items():
            self.pending[cid], r["down"][cid] = state_to_record(state, self.cfg.wire_dtype)
            self.states[cid] = record_to_state(self.pending[cid], self.cfg.wire_dtype)  # exactly what cid adopts
        r["t_aggregate"] = time.perf_counter()
        return None, MetricRecord({"train_loss": float(np.mean(list(r["losses"].values())))})

    def _check_replies(self) -> None:
        """Stop (TooFewReplies, the last checkpoint kept) when nobody replied, or when a missing client has no
        earlier round of this eta whose state and metrics it could keep."""
        missing = self._round["missing"]
        if len(missing) == len(self.infos):
            raise TooFewReplies(group=sorted(self.infos), missing=sorted(missing), needed=1)
        fresh = [c for c in missing if c not in self.states]
        if fresh:
            raise AtlasError(f"client(s) {fresh} failed in the first round of eta {self.eta:g}, before any state or "
                             "metrics of theirs existed to keep")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = []
        for cid in sorted(self._round["losses"]):  # the clients that trained this round
            if cid in self._round["missing"]:
                continue
            content = RecordDict({ATLAS: ConfigRecord({"round": server_round,
                                                       "validate": server_round == self.cfg.rounds})})
            if cid in self.pending:
                content[STATE] = self.pending.pop(cid)
            messages.append(_message(content, self.node_of[cid], MessageType.EVALUATE, group=server_round))
        self.pending.clear()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        clients, r = {}, self._round
        t_end = time.perf_counter()
        for reply in replies:
            ev = json.loads(reply.content[ATLAS]["eval"])
            cid = ev["client_id"]
            if ev["digest"] != state_digest(self.states[cid]):
                raise RuntimeError(f"client {cid} holds a state other than the server's copy of it")
            r["clients_s"]["evaluate"] += ev["evaluate_s"]
            r["work"]["evaluate"] += Tally(**ev["work"])
            clients[cid] = client_round(cid, self.shards[cid].task, r["losses"][cid], ev["test"], r["up"].get(cid, 0),
                                        r["down"].get(cid, 0))
            if "val" in ev:
                self.val[cid] = ev["val"]
            self.reports.note_client(ev["device"], ev["peak_bytes"], ev["peak_measured_by"])
            self.reports.add("rounds", cid, reply)
        for cid in r["missing"]:
            clients[cid] = self._kept(cid)
        cost = round_cost(train_s=r["t_train"] - r["t0"], aggregate_s=r["t_aggregate"] - r["t_train"],
                          evaluate_s=t_end - r["t_aggregate"], work=r["work"], clients_s=r["clients_s"])
        entry = round_summary(server_round, [clients[c] for c in sorted(clients)], list(self.tasks),
                              t_end - r["t0"], {str(c): state_digest(self.states[c]) for c in sorted(self.states)},
                              eta=self.eta if self.method.personalise else None, cost=cost,
                              missing={str(c): reason for c, reason in sorted(r["missing"].items())})
        self.rounds.append(entry)
        log_round(self.eta, entry)
        warn_diverged(self.eta, self.rounds, {n: t.num_labels for n, t in self.tasks.items()})
        self.tracker.round(self.eta, entry, self.phases_s)
        return MetricRecord({"mean_task_score": entry["mean_task_score"]})

    def _kept(self, cid: int) -> dict:
        """A missing client's round record: the metrics of its last round with a reply (it keeps that round's
        state, or the state the server sent it this round), labelled as such; its bytes are this round's."""
        last = next(c for entry in reversed(self.rounds) for c in entry["clients"]
                    if c["client_id"] == cid and not c.get("missing"))
        r = self._round
        return dict(last, missing=True, metrics_from_round=next(
            e["round"] for e in reversed(self.rounds) if last in e["clients"]),
            bytes_up=r["up"].get(cid, 0), bytes_down=r["down"].get(cid, 0))

    def summary(self) -> None:
        log.info("AtlasStrategy: %s, %d clients, %d rounds", self.cfg.method, len(self.node_of), self.cfg.rounds)

    # ---- a whole run ----------------------------------------------------------------------------
    def run(self, grid: Grid, resume: bool = False) -> dict:
        """Phases 1-2 (or a checkpoint's state with `resume`), then the rounds for every eta (one unless
        sweeping), each round checkpointed as the in-process engine does, then the result dictionary."""
        t_start = time.perf_counter()
        self.tracker = open_tracker(self.cfg, eta_grid(self.cfg))
        checkpoint = latest_checkpoint(self.cfg) if resume else None
        if checkpoint is None:
            self.phases_s = self.prepare(grid)
            clear_checkpoints(self.cfg.checkpoint_path)
            self._save(0, 0, [])
            runs, start_eta, start_round = [], 0, 0
        else:
            runs, start_eta, start_round = self._restore(grid, *checkpoint)
        setup_s = time.perf_counter() - t_start
        etas = eta_grid(self.cfg)
        try:
            for eta_index in range(start_eta, len(etas)):
                self.eta = etas[eta_index]
                if checkpoint is None or eta_index != start_eta:
                    self._reset()
                    start_round = 0
                else:
                    self.tracker.resume(self.eta, self.rounds)
                self.reports.next_eta(self.eta)
                for r in range(start_round + 1, self.cfg.rounds + 1):
                    self.train_round(grid, r)
                    self.rounds[-1]["cost"]["checkpoint_s"] = self._save(eta_index, r, runs)
                runs.append(eta_run(self.eta, self.rounds, dict(self.val)))
        except AtlasError as exc:
            raise AtlasError(f"{exc}: the run stops; its last checkpoint is kept in {self.cfg.checkpoint_path} "
                             "(bring the SuperNodes back and resume: `atlas run ... --resume`, or `flwr run` with "
                             "resume=true)") from None
        finally:
            self.tracker.close()
        result = build_result(self.cfg, self.shards, self.tasks, self.plan, runs, setup_s, self.phases_s,
                              time.perf_counter() - t_start, "cpu", clock_note=CLOCK_NOTE,
                              client_refs={cid: info["references"] for cid, info in self.infos.items()})
        chosen_eta = (result["lambda_sweep"] or {}).get("selected_eta", self.eta)
        result["communication_costs"]["transport"] = self.reports.report(
            result["communication_costs"], chosen_eta,
            complete=not any(r.get("missing_clients") for r in result["round_metrics"]))
        # Measured where the clients train, not in this (server) process.
        result["memory"] = dict(result["memory"], peak_measured_bytes=self.reports.peak,
                                measured_by=f"max over clients of {' / '.join(sorted(self.reports.measured_by))}, "
                                            "in the ClientApp processes")
        result["environment"].update(engine="flower", client_devices=sorted(self.reports.devices))
        return result

    def _save(self, eta_index: int, round_idx: int, runs: list[dict]) -> float:
        """Checkpoint the run in the in-process engine's format (`results.checkpoint`), with the server's copies
        of the clients' states and its own bookkeeping; returns the seconds it took."""
        t0 = time.perf_counter()
        payload = checkpoint_payload(self.cfg, self.plan, self.rounds, runs, self.states, flower=dict(
            infos={str(c): i for c, i in self.infos.items()}, val={str(c): v for c, v in self.val.items()},
            reports=self.reports.to_json()))
        save_checkpoint(self.cfg.checkpoint_path, eta_index=eta_index, round_idx=round_idx, states=self.states,
                        payload=payload, keep=self.cfg.keep_checkpoints)
        seconds = time.perf_counter() - t0
        self.phases_s["checkpoint"] = self.phases_s.get("checkpoint", 0.0) + seconds
        return seconds


class _Reports:
    """What the clients' replies report beside their results: the sizes of the messages Flower carried
    (the ClientApp's size mod), per phase and client, and where and how much memory they used."""

    def __init__(self):
        self.fingerprint: dict[str, int] = {}
        self.rounds: dict[str, int] = {}  # of the current eta
        self.rounds_by_eta: dict[float, dict[str, int]] = {}
        self.per_client: dict[str, dict[str, int]] = {}
        self.peak = 0
        self.measured_by: set[str] = set()
        self.devices: set[str] = set()

    def next_eta(self, eta: float) -> None:
        self.rounds = self.rounds_by_eta.setdefault(eta, {})  # kept when a resumed run continues this eta

    def to_json(self) -> dict:
        return dict(self.__dict__, rounds_by_eta=[[eta, sizes] for eta, sizes in self.rounds_by_eta.items()],
                    measured_by=sorted(self.measured_by), devices=sorted(self.devices), rounds={})

    @classmethod
    def from_json(cls, saved: dict) -> _Reports:
        reports = cls()
        reports.__dict__.update(saved, rounds_by_eta={eta: sizes for eta, sizes in saved["rounds_by_eta"]},
                                measured_by=set(saved["measured_by"]), devices=set(saved["devices"]))
        return reports

    def note_client(self, device: str, peak_bytes: int, measured_by: str) -> None:
        self.peak = max(self.peak, peak_bytes)
        self.measured_by.add(measured_by)
        self.devices.add(device)

    def add(self, phase: str, cid: int, reply: Message) -> None:
        """Add one reply's size record to its phase ('fingerprint' or 'rounds') and to its client."""
        for bucket in (getattr(self, phase), self.per_client.setdefault(str(cid), {})):
            for key, value in reply.content[TRANSPORT].items():
                bucket[key] = bucket.get(key, 0) + int(value)

    def report(self, ours: dict, eta: float, complete: bool = True) -> dict:
        """Sizes of the chosen eta's run (the one our accounting describes) beside our totals. With clients
        missing from a round (`complete` false) the two are not compared (None): a ClientApp that failed did
        not measure what it was sent."""
        rounds = self.rounds_by_eta[eta]
        return dict(
            measured_by="Flower RecordDict/ArrayRecord.count_bytes() of every message, in the ClientApp mod "
                        "transport_size_mod (as flwr's message_size_mod/arrays_size_mod measure); payload = "
                        "tensor bytes (numel x itemsize) of the carried Arrays",
            phases=dict(fingerprint=self.fingerprint, rounds=rounds),
            per_client=self.per_client,
            rounds_payload_matches_accounting=(rounds.get("up_payload", 0) == ours["total_bytes_up"]
                                               - ours["fingerprint_bytes_up"]
                                               and rounds.get("down_payload", 0) == ours["total_bytes_down"])
            if complete else None,
            note="'rounds' carries the adapters and heads our accounting counts (payload) plus NumPy headers and "
                 "array names (arrays) and control values (message); 'fingerprint' carries both fingerprint kinds "
                 "whatever the method (one is for the report only) and the run config; ranks travel as control "
                 "values of round 1. Control values are not counted as traffic by our accounting. 'phases' holds the "
                 "chosen eta's rounds; 'per_client' every message of a client (all phases, every eta of a sweep). "
                 "survival_payload: the exact float32 states that only make the run survive (BACKUPs of clients "
                 "that share nothing, RESTOREs to nodes that lost theirs), not counted by our accounting.",
        )


def _wait_for_nodes(grid: Grid, expected: int) -> list[int]:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise AtlasError(f"only {len(nodes)} of {expected} SuperNodes connected within {CONNECT_TIMEOUT_S:.0f}s")
        time.sleep(1.0)


def _message(content: RecordDict, node: int, message_type: str, group: int = 0) -> Message:
    return Message(content, dst_node_id=node, message_type=message_type, group_id=str(group))


def _exchange(grid: Grid, messages: list[Message], what: str) -> list[Message]:
    return _checked(send_and_receive(grid, messages), len(messages), what)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float = REPLY_TIMEOUT_S) -> list[Message]:
    """`Grid.send_and_receive`, checking for replies after 0.05 s and then ever less often up to every second:
    Flower 1.42's deployed grid checks every 3 s, and a round pays that wait twice (train, evaluate) however
    quick its clients are. The replies that came within `timeout`."""
    pending = set(grid.push_messages(messages))
    replies, wait, deadline = [], REPLY_POLL_S[0], time.monotonic() + timeout
    while True:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {reply.metadata.reply_to_message_id for reply in got}
        if not pending or time.monotonic() >= deadline:
            return replies
        time.sleep(wait)
        wait = min(wait * 1.5, REPLY_POLL_S[1])


def _checked(replies: Iterable[Message], expected: int, what: str) -> list[Message]:
    """All replies, or a clear error naming the client's failure (ATLAS needs every client each round)."""
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            raise AtlasError(f"a client failed during {what}: {reply.error.reason}")
    if len(replies) != expected:
        raise AtlasError(f"{what}: {len(replies)} of {expected} clients replied within {REPLY_TIMEOUT_S:.0f}s")
    return replies
