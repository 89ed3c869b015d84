"""docs/result-schema.md and .json, generated from the pydantic schema so the documentation cannot drift
(a test compares the committed files with `render()`). Regenerate: `python -m atlasfl.report.schema_doc`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from atlasfl.results.schema import SCHEMA_VERSION, json_schema

# What a field means, where the schema itself carries no description. Keys are 'Model.field' or top-level
# 'field'; a key naming no field is an error in render(), so these notes cannot outlive their field.
NOTES = {
    "schema_version": "Version of this schema; `atlas report` refuses versions it does not know.",
    "status": "`complete` once the run finished; `atlas sweep` re-runs a file that is not complete.",
    "run_name": "`atlas_<model>_<method>_seed<seed>_r<rounds>`, also the file name.",
    "model": "Model alias, Hugging Face id or folder name.",
    "method": "`local_only`, `standard_fl`, `fedavg_cluster`, `atlas_no_laplacian` or `atlas`.",
    "seed": "Seed of the run: data shards, device draws, initialisation and training order.",
    "config": "The complete run configuration: preset, then `--mode` sizes, then the user's overrides.",
    "clients": "Each client's task and its training / local-validation sizes.",
    "round_metrics": "One entry per federated round (predecessor key).",
    "final_accuracies": "Client id → last-round test accuracy (predecessor key).",
    "final_metrics": "Last-round test metrics per client, per task (mean of its clients) and the task mean.",
    "cluster_labels": "Cluster of each client (in client-id order) used as its aggregation group (predecessor key).",
    "cluster_source": "`fingerprint` (discovered in phase 1) or `oracle` (the true tasks).",
    "phase1_clustering": "Fingerprint clustering: `k`, `labels`, `silhouette`, `ari` against the true tasks, "
                         "`similarity` (K×K cosine of centred fingerprints), the spread-to-noise ratio "
                         "`tightness_by_k`, its critical value `threshold_by_k` at `significance` from the "
                         "degrees of freedom `dof_by_k`, every k under its bar `passing_k`, the split test "
                         "`split` (`statistic` G_k, `threshold`, `dof`, `k_next`) and the `ambiguous` flag it sets "
                         "(the next larger k also fits), the `margin` of the choice (docs/clustering.md) and more; "
                         "null when the method runs no phase 1.",
    "phase2_rank_allocation": "Device profiles, per-module rank allocation and the memory model (an ESTIMATE). "
                              "Per client: `device`, `feasible`, `mean_rank_cap` (the device's cap on the *mean* "
                              "rank over modules; `rank_cap` in files written before it was renamed), "
                              "`max_module_rank` (largest rank one module may get), `rank_budget` (total rank: "
                              "mean cap × modules, or less if memory binds), `ranks`, `total_rank`.",
    "ranks": "Client id → adapted module → LoRA rank actually applied.",
    "lambda_sweep": "With `--lambda-sweep`: `grid` (η values), `val_scores`, `test_scores` and `selected_eta`.",
    "communication_costs": "Bytes of the tensors actually sent; frozen weights are never sent.",
    "time_metrics": "Wall-clock seconds.",
    "memory": "Measured peak memory, and the memory model's estimate labelled as such.",
    "environment": "Python, platform, device and package versions.",
    "RoundEntry.task_scores": "Task → the task's GLUE metric, mean of its clients, after this round.",
    "RoundEntry.state_digests": "Client id → digest of its trainable state after aggregation: "
                                "equal digests, equal weights.",
    "FinalMetrics.per_client": "Client id → task, accuracy, macro_f1, f1, mcc, score (GLUE metric), metric_name, loss.",
    "CommunicationCosts.total_bytes_up": "Client → server bytes over all rounds, fingerprints included.",
    "MemoryMetrics.peak_measured_bytes": "CUDA max allocated on GPU, peak RSS on CPU.",
}

_BASIC = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "null": "null"}


def _type(s: dict) -> str:
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in s:
        return " or ".join(_type(x) for x in s["anyOf"])
    kind = s.get("type")
    if kind == "array":
        return f"list of {_type(s['items'])}" if "items" in s else "list"
    if kind == "object":
        values = s.get("additionalProperties")
        return f"object of {_type(values)}" if isinstance(values, dict) else "object"
    return _BASIC.get(kind, "any")


def _section(title: str, model: str, s: dict, used: set[str]) -> list[str]:
    lines = [f"## {title}", "", "| field | type | required | description |", "|---|---|---|---|"]
    required = set(s.get("required", ()))
    for name, prop in s["properties"].items():
        key = name if model == "Result" else f"{model}.{name}"
        used.add(key)
        text = prop.get("description") or NOTES.get(key, "")
        if "default" in prop:
            text = f"{text} Default: `{json.dumps(prop['default'])}`.".strip()
        lines.append(f"| `{name}` | {_type(prop)} | {'yes' if name in required else 'no'} | {text.replace('|', '/')} |")
    return lines + [""]


def render() -> str:
    schema = json_schema()
    used: set[str] = set()
    lines = [
        "<!-- Generated by atlasfl.report.schema_doc from atlasfl.results.schema; do not edit by hand. -->",
        "<!-- Regenerate with: python -m atlasfl.report.schema_doc -->", "",
        f"# Result JSON schema (version {SCHEMA_VERSION})", "",
        "Every run writes `results/atlas_<model>_<method>_seed<seed>_r<rounds>.json`, atomically, validated "
        "against this schema. Client ids are JSON object keys, hence strings. Unknown keys are rejected. "
        "The machine-readable JSON Schema is `result-schema.json` beside this file.", "",
        *_section("Result (top level)", "Result", schema, used),
    ]
    for name, sub in schema["$defs"].items():
        lines += _section(name, name, sub, used)
    stale = sorted(set(NOTES) - used)
    if stale:
        raise ValueError(f"schema_doc.NOTES describes fields the schema no longer has: {', '.join(stale)}")
    return "\n".join(lines).rstrip() + "\n"


def render_json() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {folder / "result-schema.md": render(), folder / "result-schema.json": render_json()}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)


if __name__ == "__main__":
    for written in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(written)
