"""Reading result files: folders are expanded, each file is recognised by its format and checked."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS
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
    return [r for f in result_files(paths) for r in read_records(f)]


def read_records(path: Path) -> list[RunRecord]:
    """Our schema-versioned files, or the predecessor's; anything else is a one-line error naming the file.
    A lambda sweep that recorded both choices of η gives two records: the shared η and η per client."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AtlasError(f"{path}: cannot read it as JSON ({exc}); pass only result files") from None
    if isinstance(data, dict) and "schema_version" in data:
        return from_atlas(data, path)
    if looks_like_predecessor(data):
        return [from_predecessor(data, path)]
    raise AtlasError(f"{path} is neither an ATLAS result (no schema_version) nor a predecessor result "
                     "(round_metrics, final_accuracies, config); remove it from the report's inputs")


PER_CLIENT_ETA = "per client"  # the η label of a sweep's per-client choice: its own method row


def from_atlas(data: dict, path: Path) -> list[RunRecord]:
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
    refs = r.references or {}
    common = dict(
        source=path, model=r.model, method=r.method, seed=r.seed, client_tasks={c.client_id: c.task for c in r.clients},
        **_costs(r), time_s=r.time_metrics.total_s, peak_memory_bytes=r.memory.peak_measured_bytes,
        clustering=r.phase1_clustering or {}, lambda_sweep=r.lambda_sweep, diverged=list(r.diverged_clients),
        tuned=r.tuning["budget"]["trials"] if r.tuning else None,
        clusters_from=METHODS[r.method].clusters_from(r.config) if r.method in METHODS else None,
        fingerprint_bytes=r.communication_costs.fingerprint_bytes_up,
        second_look=r.second_look.model_dump() if r.second_look is not None else None,
        privacy=None if r.privacy is None else r.privacy.model_dump(),
    )
    label = eta_label(r.method, r.config, searched=(r.tuning or {}).get("space", {}))
    selections = (r.lambda_sweep or {}).get("selections")
    if not selections:
        return [_record(common, label, r.final_metrics.model_dump(), r.round_metrics, refs)]
    return [_record(common, label, selections["shared"]["final_metrics"], r.round_metrics, refs),
            _record(common, PER_CLIENT_ETA, selections["per_client"]["final_metrics"], [], refs)]  # no one η's curve


def _record(common: dict, eta: str | None, fm: dict, rounds: list, refs: dict) -> RunRecord:
    """One record from a final_metrics dictionary: its global scores, and its personal ones where it has them."""
    personal = _view(fm, rounds, refs, "personal") if fm.get("personal_per_task") is not None else None
    return RunRecord(**common, eta=eta, **_view(fm, rounds, refs, "global"), personal=personal)


def _view(fm: dict, rounds: list, refs: dict, protocol: str) -> dict:
    """The RunRecord fields of one protocol: task and client scores, curves, references."""
    p = "personal_" if protocol == "personal" else ""
    per_task = fm[f"{p}per_task"]
    round_score, client_score = (f"{p}task_scores", "personal_metric" if p else "test_metric")
    references = {}
    for task, by_protocol in refs.items():
        if task in per_task:
            ref = by_protocol[protocol]
            references[task] = {kind: TaskScore(per_task[task]["metric_name"], getattr(ref, kind).score,
                                                getattr(ref, kind).accuracy) for kind in ("majority", "chance")}
    return dict(tasks={t: TaskScore(m["metric_name"], m["score"], m["accuracy"]) for t, m in per_task.items()},
                task_mean=fm[f"{p}task_mean"],
                client_scores={int(c): float(m[f"{p}score"]) for c, m in fm["per_client"].items()},
                rounds=[e.round for e in rounds], round_task_scores=[dict(getattr(e, round_score)) for e in rounds],
                round_client_scores=[{c.client_id: getattr(c, client_score) for c in e.clients} for e in rounds],
                round_bytes=[e.bytes_up_total + e.bytes_down_total for e in rounds],
                round_ari=[e.clusters.ari if e.clusters is not None else None for e in rounds],
                references=references or None)


def _costs(r) -> dict:
    """Bytes (a lambda sweep's totals over every eta where it ran one), mean phase seconds per trained round
    and the padding share of the computed token positions (schema 1.1 on), and the mean participants and simulated
    seconds per round of the chosen run (where its rounds record them)."""
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
    sampled = [e for e in r.round_metrics if e.participants is not None]  # (client sampling: docs/scale.md)
    if sampled:
        out["participants"] = sum(len(e.participants) for e in sampled) / len(sampled)
        out["simulated_round_s"] = sum(e.simulated.round_s for e in sampled) / len(sampled)
    return out
