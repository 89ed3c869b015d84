"""The result dictionary of one run (schema `results.schema`), built from what any engine collects:
the rounds of the chosen eta, the clients' local validation, the plan and the clocks. Both engines
call `build_result`, so a result JSON means the same whichever engine wrote it."""
from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np
import torch

from atlasfl.config import RunConfig
from atlasfl.data.tasks import TaskData
from atlasfl.federation.records import (
    PER_CLIENT_RULE,
    PERSONAL_KEYS,
    SHARED_RULE,
    divergence,
    select_eta,
    select_eta_per_client,
)
from atlasfl.results.schema import SCHEMA_VERSION

if TYPE_CHECKING:  # the ClientApp imports this module for `peak_memory`: it need not load the server (sklearn)
    from atlasfl.federation.server import Plan


def build_result(cfg: RunConfig, shards: list, tasks: dict[str, TaskData], plan: Plan, runs: list[dict],
                 setup_s: float, phases_s: dict, total_s: float, device: str, clock_note: str,
                 client_refs: dict[int, dict], privacy: dict | None = None) -> dict:
    """The result dictionary of one run from every eta's run (one unless sweeping). `select_eta` picks the
    shared eta whose run gives round_metrics, communication and clocks; after a sweep the per-client choice
    is recorded too, and `cfg.eta_selection` says which one is `final_metrics`. `shards` need `client_id`,
    `task`, `train` and `val` (sized); `client_refs` are `records.client_references` per client id;
    `clock_note` says where the engine's phase clocks run; `privacy` (`federation.privacy.privacy_block`) is kept
    as it is under --dp-clip."""
    run, sweep = select_eta(runs)
    rounds = [{k: v for k, v in r.items() if k != "cost"} for r in run["rounds"]]
    num_labels = {name: task.num_labels for name, task in tasks.items()}
    finals = shared = final_metrics(tasks, _per_client(shards, plan, {s.client_id: run for s in shards}, num_labels))
    if sweep is not None:
        chosen = select_eta_per_client(runs)
        own_runs = {s.client_id: chosen.get(s.client_id, run) for s in shards}
        own = final_metrics(tasks, _per_client(shards, plan, own_runs, num_labels))
        sweep["selections"] = dict(
            headline=cfg.eta_selection, shared=dict(eta=run["eta"], rule=SHARED_RULE, final_metrics=shared),
            per_client=dict(etas={str(c): r["eta"] for c, r in chosen.items()}, rule=PER_CLIENT_RULE,
                            final_metrics=own))
        if cfg.eta_selection == "per_client":
            finals = own
    diverged = sorted(int(c) for c, m in finals["per_client"].items() if m["diverged"])
    up = {str(s.client_id): sum(r["clients"][i]["bytes_up"] for r in rounds)
          + plan.fingerprint_bytes.get(s.client_id, 0) for i, s in enumerate(shards)}
    down = {str(s.client_id): sum(r["clients"][i]["bytes_down"] for r in rounds) for i, s in enumerate(shards)}
    fingerprint_bytes = sum(plan.fingerprint_bytes.values())
    costs = dict(wire_dtype=cfg.wire_dtype, total_bytes_up=sum(up.values()), total_bytes_down=sum(down.values()),
                 fingerprint_bytes_up=fingerprint_bytes, per_client_bytes_up=up, per_client_bytes_down=down)
    if sweep is not None:  # the sweep trained and communicated every eta's federation, not just the chosen one
        per_eta = [dict(eta=x["eta"], bytes_up=sum(r["bytes_up_total"] for r in x["rounds"]),
                        bytes_down=sum(r["bytes_down_total"] for r in x["rounds"])) for x in runs]
        costs.update(sweep_total_bytes_up=fingerprint_bytes + sum(e["bytes_up"] for e in per_eta),
                     sweep_total_bytes_down=sum(e["bytes_down"] for e in per_eta), per_eta=per_eta)
    return dict(
        schema_version=SCHEMA_VERSION, status="complete", run_name=cfg.run_name, model=cfg.model, method=cfg.method,
        seed=cfg.seed, config=cfg.model_dump(mode="json"),
        clients=[dict(client_id=s.client_id, task=s.task, num_train=len(s.train), num_val=len(s.val)) for s in shards],
        round_metrics=rounds,
        final_accuracies={c: m["accuracy"] for c, m in finals["per_client"].items()},
        final_metrics=finals, references=references(shards, client_refs),
        diverged_clients=diverged,
        cluster_labels=plan.cluster_labels, cluster_source=plan.cluster_source, phase1_clustering=plan.phase1,
        second_look=plan.second_look,
        phase2_rank_allocation=plan.phase2, ranks={str(c): r for c, r in plan.ranks.items()}, lambda_sweep=sweep,
        communication_costs=costs,
        time_metrics=time_metrics(runs, total_s=total_s, setup_s=setup_s, per_round_s=[r["time_s"] for r in rounds],
                                  phases_s=phases_s, clock_note=clock_note),
        memory=memory(device, plan),
        environment=environment(device),
        **({} if privacy is None else dict(privacy=privacy)),
    )


PHASES = ("train", "aggregate", "evaluate", "checkpoint")
WORK_KEYS = ("examples", "real_tokens", "padded_tokens")


def time_metrics(runs: list[dict], *, clock_note: str, **clocks) -> dict:
    """The run's clocks: every trained round's phase seconds and work (every eta of a sweep), and their
    totals over all of them, beside the run's wall clocks."""
    rounds = [dict(eta=x["eta"], round=r["round"], **r["cost"]) for x in runs for r in x["rounds"] if "cost" in r]
    totals = {f"{p}_s": sum(r[f"{p}_s"] or 0.0 for r in rounds) for p in PHASES}
    for part in ("train", "evaluate"):
        totals[part] = {k: sum(r[part][k] for r in rounds) for k in WORK_KEYS}
    return dict(clocks, rounds=rounds, totals=dict(rounds=len(rounds), **totals), clock_note=clock_note)


def _per_client(shards: list, plan: Plan, chosen: dict[int, dict], num_labels: dict[str, int]) -> dict:
    """Each client's last-round metrics on both protocols from the run chosen for it, with its
    local-validation score in that run, its device and whether it diverged in that run."""
    out, diverged = {}, {}
    for s in shards:
        run = chosen[s.client_id]
        if id(run) not in diverged:
            diverged[id(run)] = divergence(run["rounds"], num_labels)
        c = next(c for c in run["rounds"][-1]["clients"] if c["client_id"] == s.client_id)
        entry = dict(task=s.task, accuracy=c["test_accuracy"], macro_f1=c["test_macro_f1"], f1=c["test_f1"],
                     mcc=c["test_mcc"], score=c["test_metric"], metric_name=c["metric_name"], loss=c["test_loss"])
        if "personal_metric" in c:
            entry.update({f"personal_{k}": c[f"personal_{k}"] for k in PERSONAL_KEYS},
                         personal_score=c["personal_metric"])
        out[str(s.client_id)] = dict(entry, val_score=run["val"].get(s.client_id, {}).get("score"),
                                     device=plan.devices[s.client_id], diverged=s.client_id in diverged[id(run)])
    return out


def final_metrics(tasks: dict[str, TaskData], per_client: dict) -> dict:
    """Per task the mean of its clients' last-round metrics, and the mean of the task scores; the same for
    the personal protocol where the clients have it."""
    out = dict(per_client=per_client, per_task=_per_task(tasks, per_client, ""))
    out["task_mean"] = float(np.mean([t["score"] for t in out["per_task"].values()]))
    if all("personal_score" in m for m in per_client.values()):
        out["personal_per_task"] = _per_task(tasks, per_client, "personal_")
        out["personal_task_mean"] = float(np.mean([t["score"] for t in out["personal_per_task"].values()]))
    return out


def _per_task(tasks: dict[str, TaskData], per_client: dict, prefix: str) -> dict:
    per_task = {}
    for name, task in tasks.items():
        ms = [{k: m[prefix + k] for k in ("score", "accuracy", "macro_f1", "f1", "mcc")}
              for m in per_client.values() if m["task"] == name]
        per_task[name] = dict(metric_name=task.metric, **_means(ms), num_clients=len(ms))
    return per_task


def _means(ms: list[dict]) -> dict:
    """Mean of each metric over the dicts `ms` (f1 over those that have one; None if none do)."""
    out = {}
    for key in ms[0]:
        values = [m[key] for m in ms if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def references(shards: list, client_refs: dict[int, dict]) -> dict:
    """Per task and protocol the majority-class and chance scores: global ones are the task's (alike for
    all its clients); personal ones the mean over the task's clients of each client's own."""
    out = {}
    for s in shards:
        out.setdefault(s.task, []).append(client_refs[s.client_id])
    return {task: {"global": refs[0]["global"],
                   "personal": {kind: _means([r["personal"][kind] for r in refs]) for kind in ("majority", "chance")}}
            for task, refs in out.items()}


def peak_memory(device: str | torch.device) -> tuple[int, str]:
    """This process's measured peak memory: CUDA max allocated on a GPU, else the peak RSS."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (ru_maxrss)"


def memory(device: str, plan: Plan) -> dict:
    """Measured peak, with the memory model's largest per-client figure beside it, labelled an estimate."""
    biggest = max((c["memory_estimate_bytes"] for c in plan.phase2["clients"].values()),
                  key=lambda e: e["total_estimate"])
    peak, measured_by = peak_memory(device)
    return dict(peak_measured_bytes=peak, measured_by=measured_by,
                estimate=dict(kind="ESTIMATE (memory model of docs/design.md §3.2), largest client", **biggest))


def environment(device: str) -> dict:
    versions = {}
    for pkg in ("atlasfl", "torch", "transformers", "peft", "datasets", "numpy", "scikit-learn", "flwr"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return dict(python=sys.version.split()[0], platform=platform.platform(), device=device,
                cuda=torch.cuda.get_device_name(device) if device.startswith("cuda") and torch.cuda.is_available()
                else None, versions=versions)
