"""Adapter for result files of the public predecessor, so its users can table old runs beside new ones.

Its files have no schema version. Read: `config` ('model_name' or 'model', 'seed', 'ablation' or
'method', 'tasks', 'clients_per_task' (default 3)), `final_accuracies` ({client id: accuracy}),
`round_metrics` (each with 'round' and 'accuracies' {client id: accuracy}; rounds holding only
'avg_accuracy' give no per-task curve), and, when they use our key names,
`communication_costs.total_bytes_up/total_bytes_down` and `time_metrics.total_s`.
Clients are assigned to tasks in order: the first `clients_per_task` to the first task, and so on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from atlasfl.errors import AtlasError
from atlasfl.report.records import RunRecord, TaskScore, eta_label

REQUIRED_KEYS = ("round_metrics", "final_accuracies", "config")
NOTE = "predecessor format: it scored every task by accuracy, so its task scores are accuracies, not GLUE metrics"


def looks_like_predecessor(data) -> bool:
    return isinstance(data, dict) and all(k in data for k in REQUIRED_KEYS)


def from_predecessor(data: dict, path: Path) -> RunRecord:
    cfg = data["config"]
    model = cfg.get("model_name") or cfg.get("model")
    method = cfg.get("ablation") or cfg.get("method")
    tasks = cfg.get("tasks")
    if not model or not method or "seed" not in cfg or not tasks:
        raise AtlasError(f"{path}: predecessor result lacks config model_name/model, ablation/method, seed or tasks; "
                         "add them to its config or leave the file out")
    per_task = int(cfg.get("clients_per_task", 3))
    try:
        finals = {int(c): float(a) for c, a in data["final_accuracies"].items()}
    except (AttributeError, TypeError, ValueError):
        raise AtlasError(f"{path}: predecessor final_accuracies must map integer client ids to accuracies") from None
    if sorted(finals) != list(range(len(tasks) * per_task)):
        raise AtlasError(f"{path}: {len(finals)} clients in final_accuracies, but config has {len(tasks)} tasks × "
                         f"{per_task} clients per task; fix config clients_per_task")
    client_tasks = {c: tasks[c // per_task] for c in finals}

    def task_means(acc: dict[int, float]) -> dict[str, float]:
        by_task: dict[str | None, list[float]] = {}
        for c, a in acc.items():
            by_task.setdefault(client_tasks.get(c), []).append(a)
        return {t: float(np.mean(by_task[t])) for t in tasks if t in by_task}

    final_tasks = task_means(finals)
    curves = [(int(r["round"]), {int(c): float(a) for c, a in r["accuracies"].items()})
              for r in data["round_metrics"] if "accuracies" in r]
    comm = data.get("communication_costs") or {}
    time_s = (data.get("time_metrics") or {}).get("total_s")
    return RunRecord(
        source=path, model=str(model), method=str(method), seed=int(cfg["seed"]), eta=eta_label(method, cfg),
        tasks={t: TaskScore("accuracy", s, s) for t, s in final_tasks.items()},
        task_mean=float(np.mean(list(final_tasks.values()))),
        client_scores=finals, client_tasks=client_tasks,
        rounds=[r for r, _ in curves],
        round_task_scores=[task_means(acc) for _, acc in curves],
        round_client_scores=[acc for _, acc in curves],
        bytes_up=comm.get("total_bytes_up"), bytes_down=comm.get("total_bytes_down"), time_s=time_s,
        note=NOTE,
    )
