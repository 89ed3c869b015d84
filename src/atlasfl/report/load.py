"""Reading result files: folders are expanded, each file is recognised by its format and checked."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from atlasfl.errors import AtlasError
from atlasfl.report.predecessor import from_predecessor, looks_like_predecessor
from atlasfl.report.records import RunRecord, TaskScore, eta_label
from atlasfl.results.schema import KNOWN_SCHEMA_VERSIONS, validate_result


def result_files(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders contribute every *.json below them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.json"))
            if not found:
                raise AtlasError(f"no result JSON files in folder {p}; pass result files or their folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise AtlasError(f"no such result file or folder: {p}")
    return list(dict.fromkeys(files))


def load_results(paths: list[str | Path]) -> list[RunRecord]:
    return [read_record(f) for f in result_files(paths)]


def read_record(path: Path) -> RunRecord:
    """Our schema-versioned files, or the predecessor's; anything else is a one-line error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AtlasError(f"{path}: cannot read it as JSON ({exc}); pass only result files") from None
    if isinstance(data, dict) and "schema_version" in data:
        return from_atlas(data, path)
    if looks_like_predecessor(data):
        return from_predecessor(data, path)
    raise AtlasError(f"{path} is neither an ATLAS result (no schema_version) nor a predecessor result "
                     "(round_metrics, final_accuracies, config); remove it from the report's inputs")


def from_atlas(data: dict, path: Path) -> RunRecord:
    version = data["schema_version"]
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise AtlasError(f"{path}: result schema version {version!r} is not one this atlasfl reads "
                         f"({', '.join(KNOWN_SCHEMA_VERSIONS)}); report it with the atlasfl version that wrote it")
    try:
        r = validate_result(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise AtlasError(f"{path}: not a valid ATLAS result ({where}: {err['msg']}); "
                         "rerun it or leave it out") from None
    fm = r.final_metrics
    return RunRecord(
        source=path, model=r.model, method=r.method, seed=r.seed, eta=eta_label(r.method, r.config),
        tasks={t: TaskScore(m.metric_name, m.score, m.accuracy) for t, m in fm.per_task.items()},
        task_mean=fm.task_mean,
        client_scores={int(c): float(m["score"]) for c, m in fm.per_client.items()},
        client_tasks={c.client_id: c.task for c in r.clients},
        rounds=[e.round for e in r.round_metrics],
        round_task_scores=[dict(e.task_scores) for e in r.round_metrics],
        round_client_scores=[{c.client_id: c.test_metric for c in e.clients} for e in r.round_metrics],
        **_costs(r), time_s=r.time_metrics.total_s, peak_memory_bytes=r.memory.peak_measured_bytes,
        clustering=r.phase1_clustering or {}, lambda_sweep=r.lambda_sweep, diverged=list(r.diverged_clients),
    )


def _costs(r) -> dict:
    """Bytes (a lambda sweep's totals over every eta where it ran one), mean phase seconds per trained round
    and the padding share of the computed token positions (schema 1.1 on)."""
    comm, t = r.communication_costs, r.time_metrics
    sweep = comm.sweep_total_bytes_up is not None
    out = dict(bytes_up=comm.sweep_total_bytes_up if sweep else comm.total_bytes_up,
               bytes_down=comm.sweep_total_bytes_down if sweep else comm.total_bytes_down, sweep_totals=sweep)
    if t.totals and t.totals["rounds"]:
        n = t.totals["rounds"]
        out["round_phase_s"] = {p: t.totals[f"{p}_s"] / n for p in ("train", "aggregate", "evaluate")}
        positions = sum(t.totals[p]["padded_tokens"] for p in ("train", "evaluate"))
        real = sum(t.totals[p]["real_tokens"] for p in ("train", "evaluate"))
        out["padding_share"] = 1 - real / positions if positions else None
    return out
