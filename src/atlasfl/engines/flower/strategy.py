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
from atlasfl.engines.flower.records import ATLAS, STATE, TRANSPORT, config_to_json, record_to_state, state_to_record
from atlasfl.errors import AtlasError
from atlasfl.federation.client import NOISE_KEYS
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
from atlasfl.federation.server import ClientInfo, Plan, Server
from atlasfl.phases.devices import ModelFacts
from atlasfl.results.build import build_result
from atlasfl.tracking import Tracker, open_tracker

log = logging.getLogger("atlasfl")
CONNECT_TIMEOUT_S = 300.0  # how long the ServerApp waits for every SuperNode to connect
REPLY_TIMEOUT_S = 3600.0  # per message round; a lost client fails the run instead of hanging it
CLOCK_NOTE = ("flower: train_s/aggregate_s/evaluate_s are the ServerApp's wall clock from sending a phase's messages "
              "to holding all replies (so they include transport and ClientApp start-up); clients_s sums the seconds "
              "the clients measured inside local training and test evaluation; work (examples, tokens) is what the "
              "clients counted; every client evaluates (no sharing of identical states); no checkpoints")


@dataclass(frozen=True)
class RemoteShard:
    """What the server knows of a client's data: its task and sizes (the examples stay on the node)."""
    client_id: int
    task: str
    train: range
    val: range


class AtlasStrategy(Strategy):
    """One run of ATLAS over a Flower grid; the per-client states live on the nodes between rounds."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.method = METHOD_SPECS[cfg.method]
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.server: Server | None = None
        self.plan: Plan | None = None
        self.shards: list[RemoteShard] = []
        self.references: dict[int, dict] = {}  # client id -> the reference points its node computed
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
        infos, uploads = {}, {}
        for reply in replies:
            info = json.loads(reply.content[ATLAS]["client"])
            cid = info["client_id"]
            if cid in infos:
                raise AtlasError(f"two SuperNodes claim partition-id {cid}; give each node its own partition-id")
            infos[cid], self.node_of[cid] = info, reply.metadata.src_node_id
            self.references[cid] = info["references"]
            fp = reply.content["fingerprint"]
            uploads[cid] = dict(representation=fp["representation"].numpy(), gradient=fp["gradient"].numpy(),
                                **{key: float(fp[key].numpy()[0]) for key in NOISE_KEYS},
                                importance=dict(zip(info["modules"], fp["importance"].numpy().tolist())))
            self.reports.add("fingerprint", cid, reply)
        fingerprint_s = time.perf_counter() - t0
        if sorted(infos) != list(range(expected)):
            raise AtlasError(f"SuperNodes hold partition-ids {sorted(infos)}, the run needs 0..{expected - 1}")
        first = infos[0]
        self.shards = [RemoteShard(c, infos[c]["task"], range(infos[c]["num_train"]), range(infos[c]["num_val"]))
                       for c in sorted(infos)]
        self.tasks = {name: TaskData(name, next(i["num_labels"] for i in infos.values() if i["task"] == name),
                                     task_metric(name), [], []) for name in expand_tasks(self.cfg.tasks)}
        clients = [ClientInfo(c, i["task"], i["num_train"], i["num_labels"]) for c, i in sorted(infos.items())]
        self.server = Server(self.cfg, clients, modules=first["modules"], facts=ModelFacts(**first["facts"]),
                             shapes={m: tuple(s) for m, s in first["shapes"].items()})
        self.plan = self.server.plan(uploads)
        warn_infeasible(self.cfg, self.plan)
        log.info("%s over Flower: clusters %s, groups %s", self.cfg.run_name, self.plan.cluster_labels,
                 self.server.groups())
        return dict(fingerprint=fingerprint_s)

    # ---- phases 3 and 4: Flower's round cycle ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = dict(t0=time.perf_counter(), losses={}, up={}, down={},
                           work=dict(train=Tally(), evaluate=Tally()), clients_s=dict(train=0.0, evaluate=0.0))
        self.server.eta = self.eta
        sharing = set(self.server.sharing_clients())  # the others have nobody to share with: they upload nothing
        messages = []
        for cid in sorted(self.node_of):
            conf = {"round": server_round, "reset": server_round == 1, "upload": cid in sharing}
            if server_round == 1:
                conf["ranks"] = json.dumps(self.plan.ranks[cid])
            messages.append(_message(RecordDict({ATLAS: ConfigRecord(conf)}), self.node_of[cid], MessageType.TRAIN,
                                     group=server_round))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        uploads, r = {}, self._round
        r["t_train"] = time.perf_counter()
        for reply in _checked(replies, len(self.node_of), "train"):
            cid = int(reply.content[ATLAS]["client_id"])
            metrics = reply.content["metrics"]
            r["losses"][cid] = float(metrics["train_loss"])
            r["clients_s"]["train"] += float(metrics["train_s"])
            r["work"]["train"] += Tally(**{k: int(metrics[k]) for k in asdict(Tally())})
            if STATE in reply.content.array_records:
                uploads[cid] = record_to_state(reply.content[STATE], self.cfg.wire_dtype)
                self._round["up"][cid] = int(reply.content["metrics"]["bytes_up"])
            self.reports.add("rounds", cid, reply)
        for cid, state in self.server.aggregate(uploads).items():
            self.pending[cid], self._round["down"][cid] = state_to_record(state, self.cfg.wire_dtype)
        r["t_aggregate"] = time.perf_counter()
        return None, MetricRecord({"train_loss": float(np.mean(list(self._round["losses"].values())))})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = []
        for cid in sorted(self.node_of):
            content = RecordDict({ATLAS: ConfigRecord({"round": server_round,
                                                       "validate": server_round == self.cfg.rounds})})
            if cid in self.pending:
                content[STATE] = self.pending.pop(cid)
            messages.append(_message(content, self.node_of[cid], MessageType.EVALUATE, group=server_round))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        clients, digests, r = {}, {}, self._round
        t_end = time.perf_counter()
        for reply in _checked(replies, len(self.node_of), "evaluate"):
            ev = json.loads(reply.content[ATLAS]["eval"])
            cid = ev["client_id"]
            r["clients_s"]["evaluate"] += ev["evaluate_s"]
            r["work"]["evaluate"] += Tally(**ev["work"])
            digests[str(cid)] = ev["digest"]
            clients[cid] = client_round(cid, self.shards[cid].task, r["losses"][cid], ev["test"], r["up"].get(cid, 0),
                                        r["down"].get(cid, 0))
            if "val" in ev:
                self.val[cid] = ev["val"]
            self.reports.note_client(ev["device"], ev["peak_bytes"], ev["peak_measured_by"])
            self.reports.add("rounds", cid, reply)
        cost = round_cost(train_s=r["t_train"] - r["t0"], aggregate_s=r["t_aggregate"] - r["t_train"],
                          evaluate_s=t_end - r["t_aggregate"], work=r["work"], clients_s=r["clients_s"])
        entry = round_summary(server_round, [clients[c] for c in sorted(clients)], list(self.tasks),
                              t_end - r["t0"], {c: digests[c] for c in sorted(digests, key=int)},
                              eta=self.eta if self.method.personalise else None, cost=cost)
        self.rounds.append(entry)
        log_round(self.eta, entry)
        warn_diverged(self.eta, self.rounds, {n: t.num_labels for n, t in self.tasks.items()})
        self.tracker.round(self.eta, entry, self.phases_s)
        return MetricRecord({"mean_task_score": entry["mean_task_score"]})

    def summary(self) -> None:
        log.info("AtlasStrategy: %s, %d clients, %d rounds", self.cfg.method, len(self.node_of), self.cfg.rounds)

    # ---- a whole run ----------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        """Phases 1-2, then the rounds for every eta (one unless sweeping), then the result dictionary."""
        t_start = time.perf_counter()
        self.tracker = open_tracker(self.cfg, eta_grid(self.cfg))
        phases_s = self.phases_s = self.prepare(grid)
        setup_s = time.perf_counter() - t_start
        runs = []
        try:
            for eta in eta_grid(self.cfg):
                self.eta = eta
                self._reset()
                self.reports.next_eta(eta)
                self.start(grid, ArrayRecord(), num_rounds=self.cfg.rounds, timeout=REPLY_TIMEOUT_S)
                runs.append(eta_run(eta, self.rounds, dict(self.val)))
        finally:
            self.tracker.close()
        result = build_result(self.cfg, self.shards, self.tasks, self.plan, runs, setup_s, phases_s,
                              time.perf_counter() - t_start, "cpu", clock_note=CLOCK_NOTE,
                              client_refs=self.references)
        chosen_eta = (result["lambda_sweep"] or {}).get("selected_eta", self.eta)
        result["communication_costs"]["transport"] = self.reports.report(result["communication_costs"], chosen_eta)
        # Measured where the clients train, not in this (server) process.
        result["memory"] = dict(result["memory"], peak_measured_bytes=self.reports.peak,
                                measured_by=f"max over clients of {' / '.join(sorted(self.reports.measured_by))}, "
                                            "in the ClientApp processes")
        result["environment"].update(engine="flower", client_devices=sorted(self.reports.devices))
        return result


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
        self.rounds = self.rounds_by_eta[eta] = {}

    def note_client(self, device: str, peak_bytes: int, measured_by: str) -> None:
        self.peak = max(self.peak, peak_bytes)
        self.measured_by.add(measured_by)
        self.devices.add(device)

    def add(self, phase: str, cid: int, reply: Message) -> None:
        """Add one reply's size record to its phase ('fingerprint' or 'rounds') and to its client."""
        for bucket in (getattr(self, phase), self.per_client.setdefault(str(cid), {})):
            for key, value in reply.content[TRANSPORT].items():
                bucket[key] = bucket.get(key, 0) + int(value)

    def report(self, ours: dict, eta: float) -> dict:
        """Sizes of the chosen eta's run (the one our accounting describes) beside our totals."""
        rounds = self.rounds_by_eta[eta]
        return dict(
            measured_by="Flower RecordDict/ArrayRecord.count_bytes() of every message, in the ClientApp mod "
                        "transport_size_mod (as flwr's message_size_mod/arrays_size_mod measure); payload = "
                        "tensor bytes (numel x itemsize) of the carried Arrays",
            phases=dict(fingerprint=self.fingerprint, rounds=rounds),
            per_client=self.per_client,
            rounds_payload_matches_accounting=(rounds.get("up_payload", 0) == ours["total_bytes_up"]
                                               - ours["fingerprint_bytes_up"]
                                               and rounds.get("down_payload", 0) == ours["total_bytes_down"]),
            note="'rounds' carries the adapters and heads our accounting counts (payload) plus NumPy headers and "
                 "array names (arrays) and control values (message); 'fingerprint' carries both fingerprint kinds "
                 "whatever the method (one is for the report only) and the run config; ranks travel as control "
                 "values of round 1. Control values are not counted as traffic by our accounting. 'phases' holds the "
                 "chosen eta's rounds; 'per_client' every message of a client (all phases, every eta of a sweep).",
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
    return _checked(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S), len(messages), what)


def _checked(replies: Iterable[Message], expected: int, what: str) -> list[Message]:
    """All replies, or a clear error naming the client's failure (ATLAS needs every client each round)."""
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            raise AtlasError(f"a client failed during {what}: {reply.error.reason}")
    if len(replies) != expected:
        raise AtlasError(f"{what}: {len(replies)} of {expected} clients replied within {REPLY_TIMEOUT_S:.0f}s")
    return replies
