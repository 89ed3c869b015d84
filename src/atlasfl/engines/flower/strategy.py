"""The ATLAS strategy on a Flower grid: the transport under `federation.driver` that turns each of the driver's
steps into Flower messages and their replies into what the driver needs.

Before round 1 every node is queried for its fingerprint (phase 1), which also tells the server its client's task
and sizes; a client's first train message brings it its ranks. A round is a train message to every client taking
part (the clients that share this round upload their trained states; the others send a BACKUP for the server's
copy), then an evaluate message that brings each sharing client its new state, at its own ranks, and returns the
test metrics of the clients the driver asks for. The clients' states live on the nodes between rounds; the server
keeps an exact copy of each (`copies`; none yet of a client that has not trained in this eta) for its checkpoints
and for a node that lost its own. A client whose node fails or does not reply is reported missing and the driver
leaves it out of the round.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from atlasfl.config import RunConfig
from atlasfl.data.batching import Tally
from atlasfl.data.tasks import TaskData, expand_tasks, task_metric
from atlasfl.engines.flower.accounting import Reports
from atlasfl.engines.flower.membership import Membership
from atlasfl.engines.flower.polling import REPLY_TIMEOUT_S, exchange_all, message, send_and_receive
from atlasfl.engines.flower.records import (
    ATLAS,
    BACKUP,
    CANDIDATE,
    CHOICE,
    MISSED,
    RESTORE,
    STATE,
    config_to_json,
    plain_record,
    plain_state,
    record_to_state,
    state_to_record,
)
from atlasfl.errors import AtlasError
from atlasfl.federation.records import num_clients, select_eta
from atlasfl.federation.server import Plan
from atlasfl.federation.transport import CHOICE_BYTES, CaughtUp, Evaluated, Offered, Roster, Trained
from atlasfl.methods import method_for
from atlasfl.methods.base import RESIDUAL, select
from atlasfl.models.lora import state_digest
from atlasfl.phases.devices import ModelFacts
from atlasfl.phases.fingerprint import LABEL_KEYS, NOISE_KEYS

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


class AtlasStrategy:
    """One run over a Flower grid, as a `federation.driver.Transport`."""

    clock_note = CLOCK_NOTE
    stop_hint = ("bring the SuperNodes back and resume: `atlas run ... --resume`, or `flwr run` with resume=true")

    def __init__(self, cfg: RunConfig, grid: Grid):
        self.cfg = cfg
        self.method = method_for(cfg)
        self.grid = grid
        self.members = Membership(grid)
        self.infos: dict[int, dict] = {}  # client id -> what its fingerprint reply told of it
        self.ranks: dict[int, dict[str, int]] = {}
        self.reports = Reports()
        self.copies: dict[int, dict] = {}  # client id -> its state after the last round (absent: its initial one)
        self.pending: dict[int, ArrayRecord] = {}  # new states to send with the evaluate messages
        self.trained: set[int] = set()  # the clients sent a train message this round
        self.before: dict[int, dict | None] = {}  # copies as they were before this round's replies came in

    # ---- phases 1 and 2 --------------------------------------------------------------------------
    def fingerprint(self) -> tuple[Roster, dict[int, dict]]:
        expected = num_clients(self.cfg)
        nodes = self.members.wait_for_nodes(expected)
        config = ConfigRecord({"config": config_to_json(self.cfg)})
        replies = exchange_all(self.grid, [message(RecordDict({ATLAS: config}), n, MessageType.QUERY + ".fingerprint")
                                           for n in nodes], "fingerprint")
        uploads = {}
        for reply in replies:
            info = json.loads(reply.content[ATLAS]["client"])
            cid = info["client_id"]
            if cid in self.infos:
                raise AtlasError(f"two SuperNodes claim partition-id {cid}; give each node its own partition-id")
            self.infos[cid] = info
            self.members.join(cid, reply.metadata.src_node_id)
            fp = reply.content["fingerprint"]
            uploads[cid] = dict(representation=fp["representation"].numpy(), gradient=fp["gradient"].numpy(),
                                **{key: float(fp[key].numpy()[0]) for key in NOISE_KEYS},
                                **{key: fp[key].numpy() for key in LABEL_KEYS},
                                importance=dict(zip(info["modules"], fp["importance"].numpy().tolist())))
            self.reports.add("fingerprint", cid, reply)
        if sorted(self.infos) != list(range(expected)):
            raise AtlasError(f"SuperNodes hold partition-ids {sorted(self.infos)}, the run needs 0..{expected - 1}")
        return self._roster(), uploads

    def restore(self, meta: dict) -> Roster:
        """A checkpoint's clients; the nodes (new ones in a new run) are identified and get their state with their
        next message."""
        own = meta["flower"]
        self.infos = {int(c): i for c, i in own["infos"].items()}
        self.reports = Reports.from_json(own["reports"])
        self.members.wait_for_nodes(len(self.infos))
        return self._roster()

    def _roster(self) -> Roster:
        infos, first = self.infos, self.infos[0]
        shards = [RemoteShard(c, infos[c]["task"], range(infos[c]["num_train"]), range(infos[c]["num_val"]))
                  for c in sorted(infos)]
        tasks = {name: TaskData(name, next(i["num_labels"] for i in infos.values() if i["task"] == name),
                                task_metric(name), [], []) for name in expand_tasks(self.cfg.tasks)}
        return Roster(shards, tasks, {cid: info["references"] for cid, info in infos.items()}, first["modules"],
                      {m: tuple(s) for m, s in first["shapes"].items()}, ModelFacts(**first["facts"]),
                      {cid: info["train_tokens"] for cid, info in infos.items()})

    def build(self, plan: Plan) -> None:
        self.ranks = plan.ranks  # they travel with round 1 (and to every node that lost the run)

    def start_eta(self, eta: float, states: dict[int, dict] | None) -> None:
        self.reports.next_eta(eta)
        self.copies = {} if states is None else dict(states)

    # ---- a round -------------------------------------------------------------------------------
    def _bring_up(self, cid: int, conf: dict, content: RecordDict) -> None:
        """What a client's message must bring its node: a client with no copy here has not trained in this eta and
        restarts from its initial state (`reset`, with its ranks); a node that lost the run (not synced) also gets
        the run config and the server's copy of its state (RESTORE)."""
        fresh, synced = cid not in self.copies, cid in self.members.synced
        conf["reset"] = fresh
        if fresh or not synced:
            conf["ranks"] = json.dumps(self.ranks[cid])
        if not synced:
            conf["config"] = config_to_json(self.cfg)
            if not fresh:
                content[RESTORE] = plain_record(self.copies[cid])

    def train(self, round_idx: int, cohort: set[int], sharing: set[int], advance, clips=None) -> Trained:
        out = Trained(clients_s=0.0)
        self.members.refresh(set(self.infos))
        to, messages, self.trained = {}, [], set(cohort)
        for cid in sorted(cohort):
            if not self.members.reachable(cid):
                self._miss(out.missing, cid, "its SuperNode is offline")
                continue
            conf, content = {"round": round_idx, "upload": cid in sharing}, RecordDict()
            if clips and cid in sharing:
                conf["dp_clip"] = clips[cid]
            self._bring_up(cid, conf, content)
            content[ATLAS] = ConfigRecord(conf)
            to[self.members.node_of[cid]] = cid
            messages.append(message(content, self.members.node_of[cid], MessageType.TRAIN, group=round_idx))
        self.before = {}
        for reply in self._replies(messages, to, out.missing):
            cid = to.get(reply.metadata.src_node_id)  # the node the server wrote to: no client speaks for another
            if cid is None:
                continue
            try:  # a reply that cannot be read is a missing client, never a crash of the round
                metrics = reply.content["metrics"]
                loss, seconds = float(metrics["train_loss"]), float(metrics["train_s"])
                work = Tally(**{k: int(metrics[k]) for k in asdict(Tally())})
                backup = plain_state(reply.content[BACKUP]) if BACKUP in reply.content.array_records else None
                upload = (record_to_state(reply.content[STATE], self.cfg.wire_dtype), int(metrics["bytes_up"])) \
                    if STATE in reply.content.array_records else None
                within = bool(metrics["dp_within_clip"]) if upload is not None and clips else None
            except (KeyError, TypeError, ValueError) as exc:
                self._miss(out.missing, cid, f"unreadable reply: {type(exc).__name__}: {exc}"[:300])
                continue
            out.losses[cid] = loss
            out.clients_s += seconds
            out.work += work
            self.before[cid] = self.copies.get(cid)
            if backup is not None:  # what the server's copy cannot learn from the upload
                self.copies[cid] = {**self.copies.get(cid, {}), **backup}
            if upload is not None:
                out.uploads[cid], out.bytes_up[cid] = upload
                if within is not None:
                    out.within_clip[cid] = within
                # A client that uploads sends no backup of what it is sent back; one asked only for the second
                # look (`Server.sharing_clients`) is sent nothing, so its copy takes the upload (exact at float32).
                self.copies[cid] = {**self.copies.get(cid, {}), **select(upload[0], self.method.downloads)}
            self.reports.add("rounds", cid, reply)
        advance(len(out.losses))
        return out

    def reject(self, clients: set[int]) -> None:
        """The server's copy of a rejected client forgets the round's backup; its node gets that copy back."""
        for cid in clients:
            if cid in self.before:
                if self.before[cid] is None:
                    self.copies.pop(cid, None)
                else:
                    self.copies[cid] = self.before[cid]
            self.members.synced.discard(cid)

    def deliver(self, states: dict[int, dict], round_idx: int) -> dict[int, int]:
        sent = {}
        for cid, state in states.items():
            self.pending[cid], sent[cid] = state_to_record(select(state, self.method.downloads), self.cfg.wire_dtype)
            own = self.copies.get(cid, {})  # exactly what cid adopts, as its ClientApp does
            self.copies[cid] = {**own, **self.method.receive(
                record_to_state(self.pending[cid], self.cfg.wire_dtype), select(own, (RESIDUAL,)),
                ranks=self.ranks[cid], cid=cid, round_idx=round_idx)}
        return sent

    def catch_up(self, missed: dict[int, list[tuple[int, dict]]]) -> CaughtUp:
        """A query message per client with the downloads it missed (`missed-<j>`, their rounds in `rounds`); it
        adopts them in order and sends its state back as a BACKUP, which the server's copy takes (a client that has
        not trained in this eta starts from its initial state, which only its node holds)."""
        out, to, messages = CaughtUp(), {}, []
        self.members.refresh(set(self.infos))
        for cid, entries in sorted(missed.items()):
            if not self.members.reachable(cid):
                self._miss(out.missing, cid, "its SuperNode is offline")
                continue
            conf, records = {"rounds": json.dumps([r for r, _ in entries])}, {}
            for j, (_, state) in enumerate(entries):  # each already the parts the method sends down
                records[f"{MISSED}{j}"], nbytes = state_to_record(state, self.cfg.wire_dtype)
                out.bytes_down[cid] = out.bytes_down.get(cid, 0) + nbytes
            content = RecordDict(records)
            self._bring_up(cid, conf, content)
            content[ATLAS] = ConfigRecord(conf)
            to[self.members.node_of[cid]] = cid
            messages.append(message(content, self.members.node_of[cid], MessageType.QUERY + ".catch_up",
                                    group=entries[-1][0]))
        for reply in self._replies(messages, to, out.missing):
            cid = to.get(reply.metadata.src_node_id)
            try:
                self.copies[cid] = plain_state(reply.content[BACKUP])
            except (KeyError, TypeError, ValueError) as exc:
                self._miss(out.missing, cid, f"unreadable reply: {type(exc).__name__}: {exc}"[:300])
                continue
            self.reports.add("rounds", cid, reply)
        for cid in out.missing:
            out.bytes_down.pop(cid, None)
        return out

    def offer(self, round_idx: int, candidates: dict[int, list[dict]]) -> Offered:
        """A query message per client with its candidates (`candidate-<j>`); the reply names the one it adopted,
        which the server's copy of it takes up."""
        out, to, messages, sent = Offered(), {}, [], {}
        for cid, states in sorted(candidates.items()):
            records = [state_to_record(state, self.cfg.wire_dtype) for state in states]
            sent[cid] = [record for record, _ in records]
            out.bytes_down[cid] = sum(nbytes for _, nbytes in records)
            conf = {"round": round_idx, "candidates": len(records)}
            content = RecordDict({f"{CANDIDATE}{j}": record for j, (record, _) in enumerate(records)})
            self._bring_up(cid, conf, content)  # a client offered before it trains may not have met this run yet
            content[ATLAS] = ConfigRecord(conf)
            to[self.members.node_of[cid]] = cid
            messages.append(message(content, self.members.node_of[cid], MessageType.QUERY + ".offer",
                                    group=round_idx))
        for reply in self._replies(messages, to, out.missing):
            cid, choice = int(reply.content[ATLAS]["client_id"]), int(reply.content[CHOICE][CHOICE].numpy()[0])
            out.choices[cid], out.bytes_up[cid] = choice, CHOICE_BYTES
            self.copies[cid] = {**self.copies.get(cid, {}), **record_to_state(sent[cid][choice], self.cfg.wire_dtype)}
            self.reports.add("rounds", cid, reply)
        return out

    def evaluate(self, round_idx: int, clients: set[int], validate: bool, test: bool = True) -> Evaluated:
        """An evaluate message to each of `clients`; one that did not train this round (client sampling) is brought
        up to date first, as a train message would (`_bring_up`)."""
        out = Evaluated(clients_s=0.0)
        to, messages = {}, []
        for cid in sorted(clients):
            conf, content = {"round": round_idx, "validate": validate, "test": test}, RecordDict()
            if cid not in self.trained:
                self._bring_up(cid, conf, content)
            content[ATLAS] = ConfigRecord(conf)
            if cid in self.pending:
                content[STATE] = self.pending.pop(cid)
            to[self.members.node_of[cid]] = cid
            messages.append(message(content, self.members.node_of[cid], MessageType.EVALUATE, group=round_idx))
        self.pending.clear()
        for reply in self._replies(messages, to, out.missing):
            ev = json.loads(reply.content[ATLAS]["eval"])
            cid = ev["client_id"]
            if cid in self.copies and ev["digest"] != state_digest(self.copies[cid]):  # else: its initial state
                raise RuntimeError(f"client {cid} holds a state other than the server's copy of it")
            out.clients_s += ev["evaluate_s"]
            out.work += Tally(**ev["work"])
            if "test" in ev:
                out.tests[cid] = ev["test"]
            if "val" in ev:
                out.val[cid] = ev["val"]
            self.reports.note_client(ev)
            self.reports.add("rounds", cid, reply)
        return out

    def _replies(self, messages: list[Message], to: dict[int, int], missing: dict[int, str]) -> list[Message]:
        """Send and wait; the clients that send no reply, or an error (a killed SuperNode, an exception in the
        ClientApp), are noted in `missing` with Flower's reason."""
        replies = send_and_receive(self.grid, messages) if messages else []
        cid_of = {m.metadata.message_id: to[m.metadata.dst_node_id] for m in messages}
        answered = set()
        for reply in replies:
            cid = cid_of.get(reply.metadata.reply_to_message_id)
            if reply.has_error():  # Flower's reason may hold a whole traceback: its last line says what failed
                if cid is not None:
                    self._miss(missing, cid, reply.error.reason.strip().splitlines()[-1][-300:]
                               or f"error {reply.error.code}")
            elif cid is not None:
                answered.add(cid)
        for cid in set(cid_of.values()) - answered - set(missing):
            self._miss(missing, cid, f"no reply within {REPLY_TIMEOUT_S:.0f}s")
        return [reply for reply in replies if not reply.has_error()]

    def _miss(self, missing: dict[int, str], cid: int, reason: str) -> None:
        """A client left out of this round keeps its last state; its node gets the server's copy back."""
        missing.setdefault(cid, reason)
        self.members.synced.discard(cid)

    # ---- the run's bookkeeping -------------------------------------------------------------------
    def states(self, clients: Collection[int] | None = None) -> dict[int, dict]:
        return self.copies if clients is None else {c: s for c, s in self.copies.items() if c in clients}

    def checkpoint_extra(self) -> dict:
        return dict(flower=dict(infos={str(c): i for c, i in self.infos.items()}, reports=self.reports.to_json()))

    @property
    def device(self) -> str:
        """Where the clients trained, as they reported it."""
        return ", ".join(sorted(self.reports.devices)) or "unknown"

    def eta_done(self, eta_index: int) -> None:
        pass

    def finish(self, result: dict, runs: list[dict]) -> None:
        chosen, _ = select_eta(runs)
        result["communication_costs"]["transport"] = self.reports.report(
            result["communication_costs"], chosen["eta"],
            complete=not any(r.get("missing_clients") for r in result["round_metrics"]))
        # Measured where the clients train, not in this (server) process.
        result["memory"] = dict(result["memory"], peak_measured_bytes=self.reports.peak,
                                measured_by=f"max over clients of {' / '.join(sorted(self.reports.measured_by))}, "
                                            "in the ClientApp processes")
        result["environment"].update(engine="flower", client_devices=sorted(self.reports.devices),
                                     cuda=", ".join(sorted(self.reports.device_names)) or None)
