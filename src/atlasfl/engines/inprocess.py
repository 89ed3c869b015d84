"""The in-process engine: all clients share one frozen backbone in this process and the server logic
is called directly. A run is three named steps: `set_up` (data, model, server), `plan_or_restore`
(phases 1-2, or the plan of a checkpoint) and `train_etas` (the rounds of every eta of the run)."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from atlasfl.config import RunConfig
from atlasfl.data.batching import Tally, encode
from atlasfl.data.partition import ClientShard, make_shards
from atlasfl.data.tasks import TaskData, expand_tasks, load_task
from atlasfl.errors import AtlasError
from atlasfl.federation.evaluation import evaluate_client, predict, test_scores
from atlasfl.federation.fingerprint import fingerprint
from atlasfl.federation.methods import METHOD_SPECS, MethodSpec
from atlasfl.federation.records import (
    client_references,
    client_round,
    eta_grid,
    eta_run,
    log_round,
    round_cost,
    round_summary,
    select_eta,
    warn_diverged,
    warn_infeasible,
)
from atlasfl.federation.server import ClientInfo, Plan, Server
from atlasfl.federation.training import TrainJob, client_seed, train_clients, train_local
from atlasfl.federation.wire import wire
from atlasfl.models.lora import FederatedLoRAModel, state_digest
from atlasfl.models.registry import check_model_name, load_backbone, resolve_device
from atlasfl.results import adapters
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
from atlasfl.tracking import Tracker, open_tracker

log = logging.getLogger("atlasfl")
CLOCK_NOTE = ("in-process: every phase timed in this one process around all clients' work (train: local training; "
              "aggregate: wire trips and the server's aggregation or Laplacian step; evaluate: test sets, "
              "identical states scored once; checkpoint: writing the round's checkpoint)")


@dataclass
class Federation:
    """Everything one in-process run holds: its config, the shared model, the server, the clients'
    shards and their encoded examples, and the seconds each phase took."""

    cfg: RunConfig
    method: MethodSpec
    device: str
    tasks: dict[str, TaskData]
    shards: list[ClientShard]
    fm: FederatedLoRAModel
    server: Server
    train_enc: dict[int, list[dict]]
    val_enc: dict[int, list[dict]]
    test_enc: dict[str, list[dict]]
    phases_s: dict[str, float] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=Tracker)  # live curves (--tensorboard); records nothing by default

    def states(self) -> dict[int, dict[str, torch.Tensor]]:
        return {s.client_id: self.fm.get_state(s.client_id) for s in self.shards}

    def load_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        for cid, state in states.items():
            self.fm.set_state(cid, state)


def run_experiment(cfg: RunConfig, *, progress: bool = True, resume: bool = False) -> dict:
    """Run one federated experiment end to end and return its result dictionary.

    A checkpoint is written after planning and after every round; with `resume` the run continues
    from the newest complete one and ends with the same result as an uninterrupted run.
    """
    t_start = time.perf_counter()
    tracker = open_tracker(cfg, eta_grid(cfg))  # before set-up: a missing tensorboard package fails fast
    fed = set_up(cfg)
    fed.tracker = tracker
    checkpoint = latest_checkpoint(cfg) if resume else None
    plan = plan_or_restore(fed, checkpoint)
    initial = fed.states()
    setup_s = time.perf_counter() - t_start
    log.info("%s: %d clients on %s, model %s (%s) on %s, clusters %s (%s), groups %s", cfg.run_name,
             len(fed.shards), ", ".join(fed.tasks), cfg.model, fed.fm.backbone.source, fed.device,
             plan.cluster_labels, plan.cluster_source, fed.server.groups())
    if checkpoint is None:
        clear_checkpoints(cfg.checkpoint_path)  # a fresh start must not mix with an older attempt's rounds
        _save(fed, plan, 0, 0, [], [])
    else:
        restore_rng(checkpoint[0]["rng"])
        print(f"resuming {cfg.run_name} from {checkpoint_label(checkpoint[0])}", file=sys.stderr)
    try:
        runs = train_etas(fed, plan, initial, checkpoint, progress)
    finally:
        tracker.close()
    if cfg.save_adapters:
        chosen, _ = select_eta(runs)
        log.info("adapters of eta %g: %s", chosen["eta"], adapters.publish(cfg, fed.fm, runs.index(chosen),
                                                                          chosen["eta"]))
    return build_result(cfg, fed.shards, fed.tasks, plan, runs, setup_s, fed.phases_s, time.perf_counter() - t_start,
                        fed.device, clock_note=CLOCK_NOTE,
                        client_refs={s.client_id: client_references(s, fed.tasks[s.task]) for s in fed.shards})


def set_up(cfg: RunConfig) -> Federation:
    """Load the tasks, cut the shards, build the shared model and encode every client's examples."""
    check_model_name(cfg.model)
    device = resolve_device(cfg.device)
    tasks = {n: load_task(n, data_dir=cfg.data_dir, max_test=cfg.max_test_samples) for n in expand_tasks(cfg.tasks)}
    shards = make_shards(list(tasks.values()), cfg.clients_per_task, seed=cfg.seed, max_samples=cfg.max_samples,
                         dirichlet_alpha=cfg.dirichlet_alpha, val_fraction=cfg.val_fraction)
    backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=device)
    tok = backbone.tokenizer
    fm = FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    server = Server(cfg, [ClientInfo(s.client_id, s.task, len(s.train), tasks[s.task].num_labels) for s in shards],
                    modules=fm.modules, shapes=fm.module_shapes(), facts=fm.facts())
    return Federation(
        cfg=cfg, method=METHOD_SPECS[cfg.method], device=device, tasks=tasks, shards=shards, fm=fm, server=server,
        train_enc={s.client_id: encode(tok, s.train, cfg.max_length) for s in shards},
        val_enc={s.client_id: encode(tok, s.val, cfg.max_length) for s in shards},
        test_enc={n: encode(tok, t.test, cfg.max_length) for n, t in tasks.items()},
    )


def plan_or_restore(fed: Federation, checkpoint: tuple | None) -> Plan:
    """Phases 1-2 (fingerprints, clusters, devices, ranks), or the plan a checkpoint holds; then every
    client's adapter is built at its planned ranks."""
    cfg = fed.cfg
    if checkpoint is None:
        t0 = time.perf_counter()
        uploads = {s.client_id: _guard_oom(cfg, s, "fingerprinting", lambda s=s: fingerprint(
            fed.fm, fed.train_enc[s.client_id], num_labels=fed.tasks[s.task].num_labels,
            samples=cfg.fingerprint_samples, batch_size=cfg.batch_size, layers=cfg.fingerprint_layers,
            dim=cfg.fingerprint_dim, seed=cfg.seed, representation_samples=cfg.representation_samples))
            for s in fed.shards}
        fed.phases_s["fingerprint"] = time.perf_counter() - t0
        plan = fed.server.plan(uploads)
    else:
        plan = Plan.from_json(checkpoint[0]["plan"])
        fed.server.adopt(plan)
    warn_infeasible(cfg, plan)
    for s in fed.shards:
        fed.fm.add_client(s.client_id, plan.ranks[s.client_id], fed.tasks[s.task].num_labels)
    return plan


def train_etas(fed: Federation, plan: Plan, initial: dict, checkpoint: tuple | None, progress: bool) -> list[dict]:
    """The rounds of every eta of the run (one unless sweeping), each from the clients' initial states,
    continuing a checkpoint's eta and round where there is one. Returns each eta's run."""
    cfg, etas = fed.cfg, eta_grid(fed.cfg)
    runs, start_eta, start_round, rounds = [], 0, 0, []
    if checkpoint is not None:
        meta, saved_states = checkpoint
        runs, start_eta, start_round, rounds = restored_runs(meta), meta["eta_index"], meta["round"], meta["rounds"]
    with RunProgress(progress) as bars:
        for eta_index in range(start_eta, len(etas)):
            eta = fed.server.eta = etas[eta_index]
            if eta_index == start_eta and checkpoint is not None:
                fed.load_states(saved_states)
                fed.tracker.resume(eta, rounds)
            else:
                start_round, rounds = 0, []
                fed.load_states(initial)
            bars.start_rounds(f"rounds (eta={eta:g})" if len(etas) > 1 else "rounds", cfg.rounds, start_round)
            for r in range(start_round + 1, cfg.rounds + 1):
                rounds.append(run_round(fed, r, bars))
                bars.advance("round")
                log_round(eta, rounds[-1])
                warn_diverged(eta, rounds, {n: t.num_labels for n, t in fed.tasks.items()})
                rounds[-1]["cost"]["checkpoint_s"] = _save(fed, plan, eta_index, r, rounds, runs)
                fed.tracker.round(eta, rounds[-1], fed.phases_s)
            t0 = time.perf_counter()
            val = {s.client_id: evaluate_client(fed.fm, s.client_id, fed.val_enc[s.client_id], fed.tasks[s.task],
                                                cfg.eval_batch_size) for s in fed.shards}
            fed.phases_s["validation"] = fed.phases_s.get("validation", 0.0) + time.perf_counter() - t0
            if cfg.save_adapters:  # staged until the run has chosen its eta
                adapters.save_eta(cfg, fed.fm, {s.client_id: (s.task, fed.tasks[s.task].metric) for s in fed.shards},
                                  eta_index)
            runs.append(eta_run(eta, rounds, val))
    return runs


def run_round(fed: Federation, r: int, bars: RunProgress) -> dict:
    """One round: every client trains, the server aggregates (if the method shares), every client is tested.
    The round's entry carries its `cost`: seconds and work of each phase."""
    cfg, fm = fed.cfg, fed.fm
    t0 = time.perf_counter()
    losses, up, down, work = {}, {}, {}, {"train": Tally(), "evaluate": Tally()}
    bars.start_clients(len(fed.shards))
    if cfg.client_batching:
        losses = _guard_oom(cfg, None, "training", lambda: train_clients(
            fm, [TrainJob(s.client_id, fed.train_enc[s.client_id], client_seed(cfg.seed, r, s.client_id))
                 for s in fed.shards], epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
            max_rows=cfg.client_batch_rows, group_by_length=cfg.group_by_length, tally=work["train"]))
        bars.advance("client", len(fed.shards))
    else:
        for s in fed.shards:
            losses[s.client_id] = _guard_oom(cfg, s, "training", lambda s=s: train_local(
                fm, s.client_id, fed.train_enc[s.client_id], epochs=cfg.local_epochs, lr=cfg.lr,
                batch_size=cfg.batch_size, seed=client_seed(cfg.seed, r, s.client_id),
                group_by_length=cfg.group_by_length, tally=work["train"]))
            bars.advance("client")
    t_train = time.perf_counter()
    sharing = fed.server.sharing_clients()  # clients of a singleton group, or at eta 0, send nothing
    if sharing:
        uploads = {}
        for cid in sharing:
            uploads[cid], up[cid] = wire(fm.get_state(cid), cfg.wire_dtype)
        for cid, state in fed.server.aggregate(uploads).items():
            received, down[cid] = wire(state, cfg.wire_dtype)
            fm.set_state(cid, received)
    t_aggregate = time.perf_counter()
    clients, digests, evaluated = [], {}, {}
    for s in fed.shards:
        digest = digests[str(s.client_id)] = state_digest(fm.get_state(s.client_id))
        if (digest, s.task) not in evaluated:  # clients holding identical weights predict identically
            evaluated[digest, s.task] = predict(fm, s.client_id, fed.test_enc[s.task], batch_size=cfg.eval_batch_size,
                                                tally=work["evaluate"])
        ev = test_scores(fed.tasks[s.task], evaluated[digest, s.task], s.personal)  # personal rows: same predictions
        clients.append(client_round(s.client_id, s.task, losses[s.client_id], ev, up.get(s.client_id, 0),
                                    down.get(s.client_id, 0)))
    t_end = time.perf_counter()
    cost = round_cost(train_s=t_train - t0, aggregate_s=t_aggregate - t_train, evaluate_s=t_end - t_aggregate,
                      work=work)
    return round_summary(r, clients, list(fed.tasks), t_end - t0, digests,
                         eta=fed.server.eta if fed.method.personalise else None, cost=cost)


def _save(fed: Federation, plan: Plan, eta_index: int, round_idx: int, rounds: list, runs: list) -> float:
    """Checkpoint the run; its seconds add up in phases_s['checkpoint'] and are returned, its size goes to
    the log. (The saved copy of the round's cost has no checkpoint seconds yet: it is being measured.)"""
    t0 = time.perf_counter()
    cfg, states = fed.cfg, fed.states()
    payload = checkpoint_payload(cfg, plan, rounds, runs, states)
    folder = save_checkpoint(cfg.checkpoint_path, eta_index=eta_index, round_idx=round_idx, states=states,
                             payload=payload, keep=cfg.keep_checkpoints)
    seconds = time.perf_counter() - t0
    fed.phases_s["checkpoint"] = fed.phases_s.get("checkpoint", 0.0) + seconds
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info("checkpoint %s: %.2fs, %.2f MB", folder.name, seconds, size / 1e6)
    return seconds


def _guard_oom(cfg: RunConfig, shard: ClientShard | None, what: str, step):
    """Run one client step (all clients' at once when `shard` is None); a CUDA out-of-memory becomes one message
    naming the client and the remedies."""
    try:
        return step()
    except torch.OutOfMemoryError:
        who = (f"client {shard.client_id} ({shard.task})" if shard is not None else
               f"all clients together (--client-batching, at most {cfg.client_batch_rows or 'all'} rows a pass; "
               "lower --client-batch-rows)")
        raise AtlasError(
            f"CUDA out of memory while {what} {who} of {cfg.model} at batch size "
            f"{cfg.batch_size}; lower --batch-size or --fingerprint-samples, or use a smaller model "
            "(distilbert, gpt2); the last checkpoint is kept, rerun with --resume") from None


class RunProgress:
    """Progress bars on rounds and on the clients of the current round; silent when disabled."""

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

    def advance(self, which: str, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.rounds if which == "round" else self.clients, steps)
