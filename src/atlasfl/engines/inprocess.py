"""The in-process engine: a transport under `federation.driver` in which every client shares one frozen backbone
in this process and the client functions are called directly."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Collection

import torch

from atlasfl.config import RunConfig
from atlasfl.data.batching import encode
from atlasfl.data.partition import ClientShard, make_shards
from atlasfl.data.tasks import expand_tasks, load_task
from atlasfl.errors import AtlasError, RunInterrupted
from atlasfl.federation import driver
from atlasfl.federation.evaluation import adopt_lowest, evaluate_client, predict, test_scores
from atlasfl.federation.fingerprint import fingerprint
from atlasfl.federation.privacy import client_upload
from atlasfl.federation.records import client_references, partition_settings, select_eta
from atlasfl.federation.server import Plan
from atlasfl.federation.training import TrainJob, client_seed, train_client, train_cohort
from atlasfl.federation.transport import CHOICE_BYTES, CaughtUp, Evaluated, Offered, Roster, Trained
from atlasfl.federation.wire import wire
from atlasfl.methods import method_for, method_settings
from atlasfl.methods.base import select
from atlasfl.models.lora import state_digest
from atlasfl.models.personal import PersonalLoRAModel
from atlasfl.models.registry import check_model_name, load_backbone, resolve_device
from atlasfl.results import adapters
from atlasfl.results.checkpoint import NON_RESULT_KEYS

log = logging.getLogger("atlasfl")
CLOCK_NOTE = ("in-process: every phase timed in this one process around all clients' work (train: local training "
              "and the uploads' wire trip; aggregate: the server's rule and the new states' wire trip to the clients; "
              "evaluate: test sets, identical states scored once, and the last round's local validation; "
              "checkpoint: writing the round's checkpoint)")
# Phase 1's uploads of the last federation fingerprinted in this process, with the seconds they took, under its
# `phase1_key`: the runs of a demo, an in-process sweep or a study that differ only in their method fingerprint
# the same clients on the same model alike, and every client's training reseeds itself, so taking the uploads
# again changes no result (tests/integration/test_phase1_reuse.py). One entry: grids go seed by seed.
_last_phase1: dict[str, tuple[dict[int, dict], float]] = {}


def phase1_key(cfg: RunConfig) -> str:
    """Every setting but the method, the methods' own settings and where files go: two runs equal on all of these
    cut the same shards from the same data and fingerprint them on the same model the same way."""
    skip = {"method", *method_settings(), *NON_RESULT_KEYS}
    return json.dumps({k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}, sort_keys=True)


def run_experiment(cfg: RunConfig, *, progress: bool = True, resume: bool = False, on_round=None) -> dict:
    """Run one federated experiment in this process end to end (`driver.run`, which says what `on_round` gets)
    and return its result dictionary."""
    return driver.run(cfg, InProcess(cfg), resume=resume, progress=progress, on_round=on_round)


def set_up(cfg: RunConfig) -> InProcess:
    """The transport with its data and model loaded (benchmarks drive its rounds themselves)."""
    transport = InProcess(cfg)
    transport.set_up()
    return transport


class InProcess:
    """All clients of one run in this process: the tasks, the shards and their encoded examples, and the shared
    model holding every client's adapter and head (their states live there between rounds)."""

    clock_note = CLOCK_NOTE
    stop_hint = "mend what made the clients fail and continue with `atlas run ... --resume`"

    def __init__(self, cfg: RunConfig):
        check_model_name(cfg.model)
        self.cfg = cfg
        self.method = method_for(cfg)
        self.device = resolve_device(cfg.device)
        self.fm: PersonalLoRAModel | None = None
        self.roster: Roster | None = None
        self.initial: dict[int, dict] = {}
        self.before: dict[int, dict] = {}  # the sharing clients' states before the round being trained

    def set_up(self) -> Roster:
        """Load the tasks, cut the shards, build the shared model and encode every client's examples (once)."""
        if self.roster is not None:
            return self.roster
        cfg = self.cfg
        self.tasks = {n: load_task(n, data_dir=cfg.data_dir, max_test=cfg.max_test_samples)
                      for n in expand_tasks(cfg.tasks)}
        self.shards = make_shards(list(self.tasks.values()), cfg.clients_per_task, **partition_settings(cfg))
        backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=self.device)
        self.fm = PersonalLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
        tok = backbone.tokenizer
        self.train_enc = {s.client_id: encode(tok, s.train, cfg.max_length) for s in self.shards}
        self.val_enc = {s.client_id: encode(tok, s.val, cfg.max_length) for s in self.shards}
        self.test_enc = {n: encode(tok, t.test, cfg.max_length) for n, t in self.tasks.items()}
        self.roster = Roster(self.shards, self.tasks, {s.client_id: client_references(s, self.tasks[s.task])
                                                       for s in self.shards},
                             self.fm.modules, self.fm.module_shapes(), self.fm.facts(),
                             {cid: sum(len(e["input_ids"]) for e in enc) for cid, enc in self.train_enc.items()})
        return self.roster

    # ---- the driver's transport ------------------------------------------------------------------
    def fingerprint(self) -> tuple[Roster, dict[int, dict]]:
        roster, cfg = self.set_up(), self.cfg
        key = phase1_key(cfg)
        if key in _last_phase1:
            uploads, seconds = _last_phase1[key]
            log.info("phase 1: the fingerprints an earlier run in this process computed for the same clients and "
                     "model (%.1f s there) are taken again", seconds)
            self.clock_note = (f"{CLOCK_NOTE}; phase 1's fingerprints were computed by an earlier run in this process "
                               f"with the same clients and model ({seconds:.1f} s there) and taken again, so "
                               "phases_s.fingerprint is the time to take them")
            return roster, copy.deepcopy(uploads)
        t0 = time.perf_counter()
        uploads = {s.client_id: self._guard_oom(s, "fingerprinting", lambda s=s: fingerprint(
            self.fm, self.train_enc[s.client_id], num_labels=self.tasks[s.task].num_labels,
            samples=cfg.fingerprint_samples, batch_size=cfg.batch_size, layers=cfg.fingerprint_layers,
            dim=cfg.fingerprint_dim, seed=cfg.seed, representation_samples=cfg.representation_samples))
            for s in self.shards}
        _last_phase1.clear()
        _last_phase1[key] = copy.deepcopy(uploads), time.perf_counter() - t0
        return roster, uploads

    def restore(self, meta: dict) -> Roster:
        return self.set_up()

    def build(self, plan: Plan) -> None:
        for s in self.shards:
            self.fm.add_client(s.client_id, plan.ranks[s.client_id], self.tasks[s.task].num_labels,
                               personal=self.method.keeps_personal, residual=self.method.keeps_residual)
        self.initial = held_once(self.states())

    def start_eta(self, eta: float, states: dict[int, dict] | None) -> None:
        for cid, state in (self.initial if states is None else states).items():
            self.fm.set_state(cid, state)

    def train(self, round_idx: int, cohort: set[int], sharing: set[int], advance, clips=None) -> Trained:
        """The cohort's clients train (together with --client-batching). A client whose training raises is left
        out of the round with its state as it was, as a failing Flower ClientApp is; a CUDA out-of-memory stops
        the run instead: every client shares this process's device."""
        cfg, fm, out = self.cfg, self.fm, Trained()
        shards = [s for s in self.shards if s.client_id in cohort]
        self.before = {cid: fm.get_state(cid) for cid in sharing}  # a rejected reply's state, a DP update's start
        kw = dict(method=self.method, lr=cfg.lr, batch_size=cfg.batch_size, group_by_length=cfg.group_by_length,
                  tally=out.work)
        if cfg.client_batching and shards:
            out.losses = self._guard_oom(None, "training", lambda: train_cohort(
                fm, [TrainJob(s.client_id, self.train_enc[s.client_id], client_seed(cfg.seed, round_idx, s.client_id))
                     for s in shards], max_rows=cfg.client_batch_rows, **kw))
            advance(len(shards))
        else:
            for s in shards:
                before = fm.get_state(s.client_id)
                try:
                    out.losses[s.client_id] = self._guard_oom(s, "training", lambda s=s: train_client(
                        fm, s.client_id, self.train_enc[s.client_id],
                        seed=client_seed(cfg.seed, round_idx, s.client_id), **kw))
                except (AtlasError, RunInterrupted):
                    raise
                except Exception as exc:  # noqa: BLE001 -- a failing client is left out, as on Flower
                    log.error("client %d failed in round %d:\n%s", s.client_id, round_idx, traceback.format_exc())
                    fm.set_state(s.client_id, before)
                    out.missing[s.client_id] = f"{type(exc).__name__}: {exc}"[-300:]
                advance(1)
        for cid in sorted(sharing - set(out.missing)):
            upload = select(fm.get_state(cid), self.method.uploads)
            if clips:
                upload, out.within_clip[cid] = client_upload(cfg, upload, select(self.before[cid], self.method.uploads),
                                                             round_idx, cid, clips[cid])
            out.uploads[cid], out.bytes_up[cid] = wire(upload, cfg.wire_dtype)
        return out

    def reject(self, clients: set[int]) -> None:
        for cid in clients:
            self.fm.set_state(cid, self.before[cid])

    def deliver(self, states: dict[int, dict], round_idx: int) -> dict[int, int]:
        sent = {}
        for cid, state in states.items():
            received, sent[cid] = wire(select(state, self.method.downloads), self.cfg.wire_dtype)
            adopted = self.method.receive(received, self.fm.residuals.tensors(cid), ranks=self.fm.ranks[cid], cid=cid,
                                          round_idx=round_idx)
            self.fm.set_state(cid, adopted, partial=True)
        return sent

    def catch_up(self, missed: dict[int, list[tuple[int, dict]]]) -> CaughtUp:
        out = CaughtUp()
        for cid, entries in missed.items():
            out.bytes_down[cid] = sum(self.deliver({cid: state}, round_idx)[cid] for round_idx, state in entries)
        return out

    def offer(self, round_idx: int, candidates: dict[int, list[dict]]) -> Offered:
        out = Offered()
        for cid, states in candidates.items():
            received = [wire(state, self.cfg.wire_dtype) for state in states]
            out.bytes_down[cid] = sum(nbytes for _, nbytes in received)
            out.choices[cid] = adopt_lowest(self.fm, cid, self.train_enc[cid], [state for state, _ in received],
                                            batch_size=self.cfg.eval_batch_size)
            out.bytes_up[cid] = CHOICE_BYTES
        return out

    def evaluate(self, round_idx: int, clients: set[int], validate: bool, test: bool = True) -> Evaluated:
        """Test sets (clients holding identical weights predict identically, so each such state is scored once per
        task) and, after the last round, local validation."""
        cfg, out, predicted = self.cfg, Evaluated(), {}
        for s in self.shards:
            if s.client_id not in clients:
                continue
            key, used = (state_digest(self.fm.get_state(s.client_id)), s.task), self.fm.model_of(s.client_id)
            if test and key not in predicted:
                predicted[key] = predict(self.fm, used, self.test_enc[s.task], batch_size=cfg.eval_batch_size,
                                         tally=out.work)
            if test:
                out.tests[s.client_id] = test_scores(self.tasks[s.task], predicted[key], s.personal)
            if validate:
                out.val[s.client_id] = evaluate_client(self.fm, used, self.val_enc[s.client_id], self.tasks[s.task],
                                                       cfg.eval_batch_size)
        return out

    def states(self, clients: Collection[int] | None = None) -> dict[int, dict]:
        return {s.client_id: self.fm.get_state(s.client_id) for s in self.shards
                if clients is None or s.client_id in clients}

    def checkpoint_extra(self) -> dict:
        return {}

    def eta_done(self, eta_index: int) -> None:
        if self.cfg.save_adapters:  # staged until the run has chosen its eta
            adapters.save_eta(self.cfg, self.fm, {s.client_id: (s.task, self.tasks[s.task].metric)
                                                  for s in self.shards}, eta_index)

    def finish(self, result: dict, runs: list[dict]) -> None:
        if self.cfg.save_adapters:
            chosen, _ = select_eta(runs)
            log.info("adapters of eta %g: %s", chosen["eta"], adapters.publish(self.cfg, self.fm, runs.index(chosen),
                                                                              chosen["eta"]))

    def _guard_oom(self, shard: ClientShard | None, what: str, step):
        """Run one client step (all clients' at once when `shard` is None); a CUDA out-of-memory becomes one
        message naming the client and the remedies."""
        try:
            return step()
        except torch.OutOfMemoryError:
            cfg = self.cfg
            who = (f"client {shard.client_id} ({shard.task})" if shard is not None else
                   f"all clients together (--client-batching, at most {cfg.client_batch_rows or 'all'} rows a pass; "
                   "lower --client-batch-rows)")
            raise AtlasError(
                f"CUDA out of memory while {what} {who} of {cfg.model} at batch size "
                f"{cfg.batch_size}; lower --batch-size or --fingerprint-samples, or use a smaller model "
                "(distilbert, gpt2)") from None


def held_once(states: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """The states with equal tensors (dtype, shape and bytes) held once, for states that are only read. Clients of
    the same ranks and head width start identical (`FederatedLoRAModel.add_client`), so a population's initial
    states are a few distinct tensors rather than a copy of every client's adapter (docs/scale.md)."""
    kept: dict[tuple, torch.Tensor] = {}
    return {cid: {key: kept.setdefault(_identity(t), t)
                  for key, t in state.items()}
            for cid, state in states.items()}


def _identity(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy()).digest()
