"""The ATLAS `ClientApp`: one SuperNode is one client, its data chosen by its node config.

Node config: `partition-id` (the client id) and `num-partitions` (must equal tasks x clients per
task), optionally `data-dir` (this machine's GLUE folder) and `device`. The run config arrives from
the server in the first message and stays in `Context.state`, with everything else that must
survive between messages: the client's ranks, its initial state (for a lambda sweep) and its
current adapter and head. The model and the encoded shard are only a per-process cache, rebuilt
whenever a process (a Ray actor, a resident worker of `resident.py`, a `flwr-clientapp` process) meets the
client for the first time.

Every handler calls the same client functions as the in-process engine.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from atlasfl.config import RunConfig
from atlasfl.data.batching import Tally, encode
from atlasfl.engines.flower.records import (
    ATLAS,
    BACKUP,
    CANDIDATE,
    CHOICE,
    MISSED,
    RESTORE,
    STATE,
    config_from_json,
    plain_record,
    plain_state,
    record_to_state,
    state_to_record,
    transport_size_mod,
)
from atlasfl.errors import AtlasError
from atlasfl.federation.evaluation import adopt_lowest, evaluate_client, predict, test_scores
from atlasfl.federation.fingerprint import fingerprint
from atlasfl.federation.privacy import client_upload
from atlasfl.federation.records import client_references, load_client_data, num_clients
from atlasfl.federation.training import client_seed, train_client
from atlasfl.methods import method_for
from atlasfl.methods.base import part_of, select
from atlasfl.models.lora import state_digest
from atlasfl.models.personal import PersonalLoRAModel
from atlasfl.models.registry import load_backbone, resolve_device
from atlasfl.phases.fingerprint import LABEL_KEYS, NOISE_KEYS
from atlasfl.results.build import peak_memory

INITIAL = "initial"  # ArrayRecord in Context.state: the state before round 1, restored for each eta of a sweep


@dataclass
class _Work:
    """A process's cache of one run: the shared model (adapters of every client this process serves)
    and each client's encoded data."""
    key: tuple
    fm: PersonalLoRAModel
    data: dict  # client id -> (shard, task, train, val, test encodings)


_CACHE: dict[str, _Work] = {}


def _client(context: Context):
    """(config, client id, model, (shard, task, encodings)) of this node, its adapter restored from Context.state."""
    kept = context.state[ATLAS]
    cfg = _node_config(context)
    cid = int(context.node_config["partition-id"])
    key = (context.run_id, cfg.model_dump_json())
    work = _CACHE.get("run")
    if work is None or work.key != key:
        backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=resolve_device(cfg.device))
        work = _CACHE["run"] = _Work(key, PersonalLoRAModel(backbone, alpha=cfg.lora_alpha,
                                                             dropout=cfg.lora_dropout, seed=cfg.seed), {})
    if cid not in work.data:
        shard, task = load_client_data(cfg, cid)
        tok = work.fm.backbone.tokenizer
        work.data[cid] = (shard, task, encode(tok, shard.train, cfg.max_length), encode(tok, shard.val, cfg.max_length),
                          encode(tok, task.test, cfg.max_length))
    if "ranks" in kept:
        if cid not in work.fm.ranks:
            work.fm.add_client(cid, json.loads(kept["ranks"]), work.data[cid][1].num_labels,
                               personal=method_for(cfg).keeps_personal, residual=method_for(cfg).keeps_residual)
        if STATE in context.state:
            work.fm.set_state(cid, plain_state(context.state[STATE]))
    return cfg, cid, work.fm, work.data[cid]


def _node_config(context: Context) -> RunConfig:
    """The run config as this node applies it: with its own data folder and device if its node config names them."""
    own = {key: str(context.node_config[name]) for name, key in (("data-dir", "data_dir"), ("device", "device"))
           if context.node_config.get(name)}
    return config_from_json(context.state[ATLAS]["config"], **own)


def _keep_state(context: Context, fm: PersonalLoRAModel, cid: int) -> None:
    context.state[STATE] = plain_record(fm.get_state(cid))


def fingerprint_phase(msg: Message, context: Context) -> Message:
    """Phase 1 on the client: adopt the run config, load this node's shard, upload its fingerprint."""
    cfg_json = msg.content[ATLAS]["config"]
    context.state[ATLAS] = ConfigRecord({"config": cfg_json})
    cfg = _node_config(context)
    if "partition-id" not in context.node_config:
        raise AtlasError("this SuperNode has no partition-id in its node config "
                         "(start it with --node-config 'partition-id=K num-partitions=N')")
    expected = num_clients(cfg)
    if int(context.node_config.get("num-partitions", expected)) != expected:
        raise AtlasError(f"node config num-partitions={context.node_config['num-partitions']} but the run has "
                         f"{expected} clients (tasks x clients per task); start one SuperNode per client")
    cfg, cid, fm, (shard, task, train_enc, _, _) = _client(context)
    up = fingerprint(fm, train_enc, num_labels=task.num_labels, samples=cfg.fingerprint_samples,
                     batch_size=cfg.batch_size, layers=cfg.fingerprint_layers, dim=cfg.fingerprint_dim, seed=cfg.seed,
                     representation_samples=cfg.representation_samples)
    arrays = ArrayRecord({key: Array(np.asarray(value, dtype=np.float32)) for key, value in (
        ("representation", up["representation"]), ("gradient", up["gradient"]),
        *((key, [up[key]]) for key in NOISE_KEYS), *((key, up[key]) for key in LABEL_KEYS),
        ("importance", [up["importance"][m] for m in fm.modules]))})
    info = dict(client_id=cid, task=shard.task, num_train=len(shard.train), num_val=len(shard.val),
                num_labels=task.num_labels, modules=fm.modules,
                shapes={m: list(s) for m, s in fm.module_shapes().items()},
                facts=asdict(fm.facts()), references=client_references(shard, task),
                train_tokens=sum(len(e["input_ids"]) for e in train_enc))
    return Message(RecordDict({"fingerprint": arrays, ATLAS: ConfigRecord({"client": json.dumps(info)})}), reply_to=msg)


def identify(msg: Message, context: Context) -> Message:
    """Which client this node serves: asked of a node the ServerApp has not met in this run (a restarted
    SuperNode, or every node of a resumed run), whose state then comes from the server's copy."""
    return Message(RecordDict({ATLAS: ConfigRecord({"client_id": int(context.node_config["partition-id"])})}),
                   reply_to=msg)


def _bring_up(msg: Message, context: Context) -> None:
    """Take up what the server's message brings (`AtlasStrategy._bring_up`): a client's first message in an eta
    brings its ranks (phase 2's outcome) and restarts it from its initial state (`reset`); a node that lost the run
    (restarted, failed, or a resumed run) also gets the run config and, once it has trained, its last state
    (RESTORE)."""
    conf = msg.content[ATLAS]
    if "config" in conf:
        context.state[ATLAS] = ConfigRecord({"config": conf["config"]})
    if "ranks" in conf:
        context.state[ATLAS]["ranks"] = conf["ranks"]
    if INITIAL not in context.state:  # build the adapter at the planned ranks, keep its start
        _, cid, fm, _ = _client(context)
        context.state[INITIAL] = plain_record(fm.get_state(cid))
    if conf.get("reset"):
        context.state[STATE] = context.state[INITIAL]
    elif RESTORE in msg.content.array_records:
        context.state[STATE] = msg.content[RESTORE]


def train(msg: Message, context: Context) -> Message:
    """Local training of what the method trains, from the client's current state (`_bring_up`); what the method
    uploads is sent if the server asks (the client shares with somebody this round: `Server.sharing_clients`),
    and what the server cannot know from it (all of the state if the client shares nothing, else what the server
    sends no new value of) goes as a BACKUP for the server's copy."""
    conf = msg.content[ATLAS]
    _bring_up(msg, context)
    cfg, cid, fm, (_, _, train_enc, _, _) = _client(context)
    method = method_for(cfg)
    start = select(fm.get_state(cid), method.uploads)
    t0, tally = time.perf_counter(), Tally()
    loss = train_client(fm, cid, train_enc, method=method, lr=cfg.lr, batch_size=cfg.batch_size,
                        seed=client_seed(cfg.seed, int(conf["round"]), cid), group_by_length=cfg.group_by_length,
                        tally=tally)
    metrics = MetricRecord({"train_loss": loss, "train_s": time.perf_counter() - t0, **asdict(tally)})
    _keep_state(context, fm, cid)
    content = RecordDict({ATLAS: ConfigRecord({"client_id": cid}), "metrics": metrics})
    state = fm.get_state(cid)
    kept = {key: value for key, value in state.items() if not conf["upload"] or part_of(key) not in method.downloads}
    if conf["upload"]:
        upload = select(state, method.uploads)
        if "dp_clip" in conf:
            upload, within = client_upload(cfg, upload, start, int(conf["round"]), cid, float(conf["dp_clip"]))
            content["metrics"]["dp_within_clip"] = int(within)
        content[STATE], nbytes = state_to_record(upload, cfg.wire_dtype)
        content["metrics"]["bytes_up"] = nbytes
    if kept:
        content[BACKUP] = plain_record(kept)
    return Message(content, reply_to=msg)


def offer(msg: Message, context: Context) -> Message:
    """Score each candidate state the server offers on this client's training data, adopt the lowest loss, and
    say which (`Transport.offer`); a client offered before it trains is brought up to date first (`_bring_up`)."""
    _bring_up(msg, context)
    cfg, cid, fm, (_, _, train_enc, _, _) = _client(context)
    candidates = [record_to_state(msg.content[f"{CANDIDATE}{j}"], cfg.wire_dtype)
                  for j in range(int(msg.content[ATLAS]["candidates"]))]
    choice = adopt_lowest(fm, cid, train_enc, candidates, batch_size=cfg.eval_batch_size)
    _keep_state(context, fm, cid)
    return Message(RecordDict({ATLAS: ConfigRecord({"client_id": cid}),
                               CHOICE: ArrayRecord({CHOICE: Array(np.array([choice], dtype=np.int32))})}), reply_to=msg)


def _adopt(cfg: RunConfig, fm: PersonalLoRAModel, cid: int, record: ArrayRecord, round_idx: int) -> None:
    """Take up a download of round `round_idx` as the method says (`Method.receive`)."""
    received = record_to_state(record, cfg.wire_dtype)
    fm.set_state(cid, method_for(cfg).receive(received, fm.residuals.tensors(cid), ranks=fm.ranks[cid], cid=cid,
                                              round_idx=round_idx), partial=True)


def catch_up(msg: Message, context: Context) -> Message:
    """Adopt, in order, the downloads of the rounds this client took no part in (`Transport.catch_up`), and send
    the state back for the server's copy."""
    _bring_up(msg, context)
    cfg, cid, fm, _ = _client(context)
    for j, round_idx in enumerate(json.loads(msg.content[ATLAS]["rounds"])):
        _adopt(cfg, fm, cid, msg.content[f"{MISSED}{j}"], round_idx)
    _keep_state(context, fm, cid)
    return Message(RecordDict({ATLAS: ConfigRecord({"client_id": cid}), BACKUP: plain_record(fm.get_state(cid))}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Adopt the state the server sent (if any), then score it on the test set and, from the same
    predictions, on its personal rows (unless the round has no test: --eval-every), and on the local validation
    set when asked. A client that did not train this round (client sampling) is brought up to date first
    (`_bring_up`)."""
    if "reset" in msg.content[ATLAS]:
        _bring_up(msg, context)
    cfg, cid, fm, (shard, task, _, val_enc, test_enc) = _client(context)
    if STATE in msg.content.array_records:
        _adopt(cfg, fm, cid, msg.content[STATE], int(msg.content[ATLAS]["round"]))
        _keep_state(context, fm, cid)
    t0, tally, scored = time.perf_counter(), Tally(), {}
    if msg.content[ATLAS]["test"]:
        scored["test"] = test_scores(task, predict(fm, fm.model_of(cid), test_enc, batch_size=cfg.eval_batch_size,
                                                 tally=tally), shard.personal)
    reply = dict(client_id=cid, digest=state_digest(fm.get_state(cid)), **scored, evaluate_s=time.perf_counter() - t0,
                 work=asdict(tally), **_peak_memory(fm.device))
    if msg.content[ATLAS]["validate"]:
        reply["val"] = evaluate_client(fm, fm.model_of(cid), val_enc, task, cfg.eval_batch_size)
    return Message(RecordDict({ATLAS: ConfigRecord({"eval": json.dumps(reply)})}), reply_to=msg)


def _peak_memory(device: torch.device) -> dict:
    """This process's device and its measured peak, as the in-process engine measures its own."""
    peak, measured_by = peak_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(device=str(device), device_name=name, peak_bytes=peak, peak_measured_by=measured_by)


def make_client_app(*mods) -> ClientApp:
    """The ATLAS ClientApp: Flower's handlers above, behind the message-size mod and any further `mods` (a test
    injects failures with one)."""
    client_app = ClientApp(mods=[transport_size_mod, *mods])
    client_app.query("fingerprint")(fingerprint_phase)
    client_app.query("identify")(identify)
    client_app.query("offer")(offer)
    client_app.query("catch_up")(catch_up)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
