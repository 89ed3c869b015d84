"""The in-process engine: all clients share one frozen backbone in this process, the server logic is
called directly. Produces the result dictionary of `atlasfl.results.schema`."""
from __future__ import annotations

import logging
import platform
import resource
import sys
import time
from dataclasses import asdict
from importlib import metadata

import numpy as np
import torch

from atlasfl.config import RunConfig
from atlasfl.data.batching import encode
from atlasfl.errors import AtlasError
from atlasfl.data.partition import ClientShard, make_shards
from atlasfl.data.tasks import TaskData, expand_tasks, load_task
from atlasfl.federation.client import client_seed, fingerprint, predict, train_local
from atlasfl.federation.methods import METHOD_SPECS, MethodSpec
from atlasfl.federation.rounds import client_round, round_summary, select_eta
from atlasfl.federation.server import ClientInfo, Plan, Server
from atlasfl.metrics import classification_metrics, task_score
from atlasfl.models.lora import FederatedLoRAModel, state_digest
from atlasfl.models.registry import check_model_name, load_backbone
from atlasfl.results.checkpoint import (clear_checkpoints, complete_checkpoints, config_differences, load_checkpoint,
                                        restore_rng, save_checkpoint)
from atlasfl.results.schema import SCHEMA_VERSION

log = logging.getLogger("atlasfl")

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def wire(state: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state as it arrives after a trip at the wire dtype, and the bytes that trip carried."""
    wd = WIRE_DTYPES[dtype]
    sent = {k: v.to(wd) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in sent.values())
    return {k: v.to(state[k].dtype) for k, v in sent.items()}, nbytes


def evaluate_client(fm, cid, encoded, task: TaskData, batch_size) -> dict:
    y_true, y_pred, loss = predict(fm, cid, encoded, batch_size=batch_size)
    m = classification_metrics(y_true, y_pred, task.num_labels)
    return {**m, "loss": loss, "score": task_score(task.metric, m), "metric_name": task.metric}


def run_experiment(cfg: RunConfig, *, progress: bool = True, resume: bool = False) -> dict:
    """Run one federated experiment end to end and return its result dictionary.

    A checkpoint is written after planning and after every round; with `resume` the run continues
    from the newest complete one and ends with the same result as an uninterrupted run.
    """
    t_start = time.perf_counter()
    check_model_name(cfg.model)
    method = METHOD_SPECS[cfg.method]
    device = resolve_device(cfg.device)
    tasks = {n: load_task(n, data_dir=cfg.data_dir, max_test=cfg.max_test_samples) for n in expand_tasks(cfg.tasks)}
    shards = make_shards(list(tasks.values()), cfg.clients_per_task, seed=cfg.seed, max_samples=cfg.max_samples,
                         dirichlet_alpha=cfg.dirichlet_alpha)
    backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=device)
    tok = backbone.tokenizer
    train_enc = {s.client_id: encode(tok, s.train, cfg.max_length) for s in shards}
    val_enc = {s.client_id: encode(tok, s.val, cfg.max_length) for s in shards}
    test_enc = {n: encode(tok, t.test, cfg.max_length) for n, t in tasks.items()}

    fm = FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    server = Server(cfg, [ClientInfo(s.client_id, s.task, len(s.train), tasks[s.task].num_labels) for s in shards],
                    modules=fm.modules, shapes=fm.module_shapes(), facts=fm.facts())
    checkpoint = _latest_checkpoint(cfg) if resume else None
    phases_s = {}
    if checkpoint is None:
        t_phase = time.perf_counter()
        uploads = {s.client_id: _guard_oom(cfg, s, "fingerprinting", lambda s=s: fingerprint(
            fm, train_enc[s.client_id], num_labels=tasks[s.task].num_labels, samples=cfg.fingerprint_samples,
            batch_size=cfg.batch_size, layers=cfg.fingerprint_layers, dim=cfg.fingerprint_dim, seed=cfg.seed))
            for s in shards}
        phases_s["fingerprint"] = time.perf_counter() - t_phase
        plan = server.plan(uploads)
    else:
        meta, saved_states = checkpoint
        plan = Plan.from_json(meta["plan"])
        server.adopt(plan)
    warn_infeasible(cfg, plan)
    for s in shards:
        fm.add_client(s.client_id, plan.ranks[s.client_id], tasks[s.task].num_labels)
    initial = {s.client_id: fm.get_state(s.client_id) for s in shards}
    setup_s = time.perf_counter() - t_start
    log.info("%s: %d clients on %s, model %s (%s) on %s, clusters %s (%s), groups %s", cfg.run_name, len(shards),
             ", ".join(tasks), cfg.model, backbone.source, device, plan.cluster_labels, plan.cluster_source,
             server.groups())

    etas = cfg.lambda_grid if (cfg.lambda_sweep and method.personalise) else (cfg.eta,)
    runs, start_eta, start_round, rounds = [], 0, 0, []
    if checkpoint is None:
        clear_checkpoints(cfg.checkpoint_path)  # a fresh start must not mix with an older attempt's rounds
        _save(cfg, fm, shards, plan, 0, 0, [], runs, phases_s)
    else:
        runs, start_eta, start_round, rounds = meta["runs"], meta["eta_index"], meta["round"], meta["rounds"]
        for run in runs:
            run["val"] = {int(c): v for c, v in run["val"].items()}
        restore_rng(meta["rng"])
        print(f"resuming {cfg.run_name} from {checkpoint_label(meta)}", file=sys.stderr)
    with RunProgress(progress) as bars:
        for eta_index in range(start_eta, len(etas)):
            eta = server.eta = etas[eta_index]
            if eta_index == start_eta and checkpoint is not None:
                for cid, state in saved_states.items():
                    fm.set_state(cid, state)
            else:
                start_round, rounds = 0, []
                for cid, state in initial.items():
                    fm.set_state(cid, state)
            bars.start_rounds(f"rounds (eta={eta:g})" if len(etas) > 1 else "rounds", cfg.rounds, start_round)
            for r in range(start_round + 1, cfg.rounds + 1):
                rounds.append(_run_round(cfg, r, method, fm, server, shards, tasks, train_enc, test_enc, bars))
                bars.advance("round")
                if method.personalise:
                    rounds[-1]["lambda_eta"] = eta
                log.info("eta %g round %d: mean task score %.4f, %.1fs", eta, r, rounds[-1]["mean_task_score"],
                         rounds[-1]["time_s"])
                _save(cfg, fm, shards, plan, eta_index, r, rounds, runs, phases_s)
            val = {s.client_id: evaluate_client(fm, s.client_id, val_enc[s.client_id], tasks[s.task], cfg.batch_size * 2)
                   for s in shards}
            runs.append(dict(eta=eta, rounds=rounds, val=val, val_score=float(np.mean([v["score"] for v in val.values()]))))
    chosen, sweep = select_eta(runs)
    return build_result(cfg, shards, tasks, plan, chosen, sweep, setup_s, phases_s, time.perf_counter() - t_start,
                        device)


def checkpoint_label(meta: dict) -> str:
    return f"round {meta['round']}" + (f" of eta #{meta['eta_index']}" if meta["eta_index"] else "")


def _latest_checkpoint(cfg: RunConfig):
    """The newest complete checkpoint of this run, or None (with a notice) when there is none."""
    found = complete_checkpoints(cfg.checkpoint_path)
    if not found:
        print(f"no checkpoint of {cfg.run_name} under {cfg.checkpoint_dir}/: starting from the beginning",
              file=sys.stderr)
        return None
    meta, states = load_checkpoint(found[-1])
    differing = config_differences(meta["config"], cfg.model_dump(mode="json"))
    if differing:
        raise AtlasError(f"checkpoint {found[-1]} was made with a different config ({', '.join(differing)} "
                         "differ); rerun with the same flags, or without --resume to start afresh")
    return meta, states


def _save(cfg, fm, shards, plan: Plan, eta_index: int, round_idx: int, rounds: list, runs: list,
          phases_s: dict) -> None:
    """Checkpoint the run; its seconds add up in phases_s['checkpoint'] and its size goes to the log."""
    t0 = time.perf_counter()
    states = {s.client_id: fm.get_state(s.client_id) for s in shards}
    payload = dict(config=cfg.model_dump(mode="json"), plan=asdict(plan), rounds=rounds,
                   runs=[dict(run, val={str(c): v for c, v in run["val"].items()}) for run in runs],
                   digests={str(c): state_digest(st) for c, st in states.items()},
                   optimizer="AdamW is created afresh each round: no moments to keep")
    folder = save_checkpoint(cfg.checkpoint_path, eta_index=eta_index, round_idx=round_idx, states=states,
                             payload=payload, keep=cfg.keep_checkpoints)
    seconds = time.perf_counter() - t0
    phases_s["checkpoint"] = phases_s.get("checkpoint", 0.0) + seconds
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info("checkpoint %s: %.2fs, %.2f MB", folder.name, seconds, size / 1e6)


def _guard_oom(cfg: RunConfig, shard: ClientShard, what: str, step):
    """Run one client step; a CUDA out-of-memory becomes one message naming the client and the remedies."""
    try:
        return step()
    except torch.OutOfMemoryError:
        raise AtlasError(
            f"CUDA out of memory while {what} client {shard.client_id} ({shard.task}) of {cfg.model} at batch size "
            f"{cfg.batch_size}; lower --batch-size or --fingerprint-samples, or use a smaller model "
            "(distilbert, gpt2); the last checkpoint is kept, rerun with --resume") from None


def warn_infeasible(cfg: RunConfig, plan: Plan) -> None:
    """Say loudly, in the log and on stderr, which clients the memory estimate says cannot train."""
    for cid, info in plan.phase2["clients"].items():
        if not info["feasible"]:
            need = info["memory_estimate_bytes"]["total_estimate"] / 2**30
            msg = (f"warning: client {cid} ({info['device']}, {info['memory_budget_bytes'] / 2**30:.0f} GiB) cannot "
                   f"train {cfg.model} by the memory estimate ({need:.1f} GiB); it is trained in this simulation "
                   "and flagged infeasible in the result JSON")
            log.warning(msg)
            print(msg, file=sys.stderr)


def _run_round(cfg, r, method: MethodSpec, fm, server: Server, shards, tasks, train_enc, test_enc,
               bars: RunProgress) -> dict:
    t0 = time.perf_counter()
    losses, up, down = {}, {}, {}
    bars.start_clients(len(shards))
    for s in shards:
        losses[s.client_id] = _guard_oom(cfg, s, "training", lambda s=s: train_local(
            fm, s.client_id, train_enc[s.client_id], epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
            seed=client_seed(cfg.seed, r, s.client_id)))
        bars.advance("client")
    if method.communicates:
        uploads = {}
        for s in shards:
            uploads[s.client_id], up[s.client_id] = wire(fm.get_state(s.client_id), cfg.wire_dtype)
        for cid, state in server.aggregate(uploads).items():
            received, down[cid] = wire(state, cfg.wire_dtype)
            fm.set_state(cid, received)
    clients, digests, evaluated = [], {}, {}
    for s in shards:
        digest = digests[str(s.client_id)] = state_digest(fm.get_state(s.client_id))
        if (digest, s.task) not in evaluated:  # clients holding identical weights score identically
            evaluated[digest, s.task] = evaluate_client(fm, s.client_id, test_enc[s.task], tasks[s.task],
                                                        cfg.batch_size * 2)
        ev = evaluated[digest, s.task]
        clients.append(client_round(s.client_id, s.task, losses[s.client_id], ev, up.get(s.client_id, 0),
                                    down.get(s.client_id, 0)))
    return round_summary(r, clients, list(tasks), time.perf_counter() - t0, digests)


def _final_metrics(rounds: list[dict], tasks: dict[str, TaskData], per_client: dict) -> dict:
    per_task = {}
    for name, task in tasks.items():
        ms = [m for m in per_client.values() if m["task"] == name]
        f1s = [m["f1"] for m in ms if m["f1"] is not None]
        per_task[name] = dict(metric_name=task.metric, score=float(np.mean([m["score"] for m in ms])),
                              accuracy=float(np.mean([m["accuracy"] for m in ms])),
                              macro_f1=float(np.mean([m["macro_f1"] for m in ms])),
                              f1=float(np.mean(f1s)) if f1s else None, mcc=float(np.mean([m["mcc"] for m in ms])),
                              num_clients=len(ms))
    return dict(per_client=per_client, per_task=per_task,
                task_mean=float(np.mean([t["score"] for t in per_task.values()])))


def build_result(cfg: RunConfig, shards: list[ClientShard], tasks: dict[str, TaskData], plan: Plan, run: dict,
                 sweep: dict | None, setup_s: float, phases_s: dict, total_s: float, device: str) -> dict:
    """The result dictionary of one run, from what any engine collects (rounds, validation, the plan)."""
    rounds = run["rounds"]
    last = {c["client_id"]: c for c in rounds[-1]["clients"]}
    per_client = {}
    for s in shards:
        c = last[s.client_id]
        per_client[str(s.client_id)] = dict(task=s.task, accuracy=c["test_accuracy"], macro_f1=c["test_macro_f1"],
                                            f1=c["test_f1"], mcc=c["test_mcc"], score=c["test_metric"],
                                            metric_name=c["metric_name"], loss=c["test_loss"],
                                            val_score=run["val"][s.client_id]["score"],
                                            device=plan.devices[s.client_id])
    up = {str(s.client_id): sum(r["clients"][i]["bytes_up"] for r in rounds) + plan.fingerprint_bytes.get(s.client_id, 0)
          for i, s in enumerate(shards)}
    down = {str(s.client_id): sum(r["clients"][i]["bytes_down"] for r in rounds) for i, s in enumerate(shards)}
    return dict(
        schema_version=SCHEMA_VERSION, status="complete", run_name=cfg.run_name, model=cfg.model, method=cfg.method,
        seed=cfg.seed, config=cfg.model_dump(mode="json"),
        clients=[dict(client_id=s.client_id, task=s.task, num_train=len(s.train), num_val=len(s.val)) for s in shards],
        round_metrics=rounds,
        final_accuracies={str(c): m["test_accuracy"] for c, m in last.items()},
        final_metrics=_final_metrics(rounds, tasks, per_client),
        cluster_labels=plan.cluster_labels, cluster_source=plan.cluster_source, phase1_clustering=plan.phase1,
        phase2_rank_allocation=plan.phase2, ranks={str(c): r for c, r in plan.ranks.items()}, lambda_sweep=sweep,
        communication_costs=dict(wire_dtype=cfg.wire_dtype, total_bytes_up=sum(up.values()),
                                 total_bytes_down=sum(down.values()),
                                 fingerprint_bytes_up=sum(plan.fingerprint_bytes.values()),
                                 per_client_bytes_up=up, per_client_bytes_down=down),
        time_metrics=dict(total_s=total_s, setup_s=setup_s, per_round_s=[r["time_s"] for r in rounds], phases_s=phases_s),
        memory=_memory(device, plan),
        environment=_environment(device),
    )


def _memory(device: str, plan: Plan) -> dict:
    """Measured peak, with the memory model's largest per-client figure beside it, labelled an estimate."""
    biggest = max((c["memory_estimate_bytes"] for c in plan.phase2["clients"].values()),
                  key=lambda e: e["total_estimate"])
    estimate = dict(kind="ESTIMATE (memory model of DESIGN §3.2), largest client", **biggest)
    if device.startswith("cuda"):
        return dict(peak_measured_bytes=int(torch.cuda.max_memory_allocated()),
                    measured_by="torch.cuda.max_memory_allocated", estimate=estimate)
    return dict(peak_measured_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                measured_by="peak RSS of the process (ru_maxrss)", estimate=estimate)


def _environment(device: str) -> dict:
    versions = {}
    for pkg in ("atlasfl", "torch", "transformers", "peft", "datasets", "numpy", "scikit-learn", "flwr"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return dict(python=sys.version.split()[0], platform=platform.platform(), device=device,
                cuda=torch.cuda.get_device_name() if device.startswith("cuda") else None, versions=versions)


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

    def advance(self, which: str) -> None:
        if self.bar is not None:
            self.bar.advance(self.rounds if which == "round" else self.clients)
