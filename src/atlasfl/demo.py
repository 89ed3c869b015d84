"""`atlas demo`: ATLAS beside the two baselines that frame it, on one small offline setting, and one table of
what they scored against the references. The settings were chosen on validation of development seed 7
(docs/demo.md); the demo's own seed is none of the benchmark's."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atlasfl.config import RunConfig, build_config
from atlasfl.experiment import is_complete, run_and_save
from atlasfl.results.checkpoint import stale_checkpoint

# The research benchmark's skewed regime (benchmarks/research/skewed.toml), made smaller: personal protocol,
# Dirichlet label skew within each task, packaged MiniLM, three offline tasks of 3 clients each; tested in the first
# round and the last only (the table shows the last).
DEMO = dict(model="minilm", seed=2026, tasks=("movie_sentiment", "sms_spam", "question_type"), clients_per_task=3,
            max_samples=80, val_fraction=0.3, dirichlet_alpha=1.0, rounds=3, local_epochs=2, lr=1e-3,
            batch_size=16, max_length=64, max_test_samples=100, group_by_length=True, eval_every=3)
# The methods in table order, each with what it sets beyond DEMO; the last is the one the baselines frame.
DEMO_METHODS = {"local_only": {}, "fedavg_cluster": {}, "atlas": dict(eta=1.0)}
PROTOCOL = "personal"  # each client on test rows that follow its own label mix, as in the skewed regime


def demo_configs(output_dir: str) -> dict[str, RunConfig]:
    d = dict(DEMO)
    model, seed = d.pop("model"), d.pop("seed")
    return {m: build_config(model, seed, m, output_dir=output_dir, **d, **extra) for m, extra in DEMO_METHODS.items()}


def finished(cfg: RunConfig) -> dict | None:
    """The complete result of exactly this config, if one is on disk (an older demo's settings do not count)."""
    if not is_complete(cfg.result_path):
        return None
    result = json.loads(cfg.result_path.read_text())
    return result if result["config"] == cfg.model_dump(mode="json") else None


def run_demo(output_dir: str, *, overwrite: bool = False,
             say: Callable[[str], None] = print) -> dict[str, tuple[dict, Path]]:
    """Every method's result and path: a finished one is read back unless `overwrite`; an interrupted one
    continues from its checkpoint (one an older demo's settings left behind is set aside); `overwrite` trains all
    of them afresh."""
    out = {}
    for i, (method, cfg) in enumerate(demo_configs(output_dir).items(), 1):
        result = None if overwrite else finished(cfg)
        if result is not None:
            say(f"[{i}/{len(DEMO_METHODS)}] {cfg.run_name}: finished earlier, read back ({cfg.result_path})")
            out[method] = result, cfg.result_path
            continue
        stale = None if overwrite else stale_checkpoint(cfg)
        say(f"[{i}/{len(DEMO_METHODS)}] {cfg.run_name}: training"
            + (f" afresh (its checkpoint {stale}: an older demo's)" if stale else ""))
        out[method] = run_and_save(cfg, overwrite=True, resume=not overwrite and stale is None)
    return out


@dataclass
class Comparison:
    header: list[str]
    rows: list[list[str]]
    sentence: str


def label(result: dict) -> str:
    eta = result["config"].get("eta") if result["method"] == "atlas" else None
    return result["method"] if eta is None else f"{result['method']} (η={eta:g})"


def compare(results: dict[str, dict], paths: dict[str, Path] | None = None, protocol: str = PROTOCOL) -> Comparison:
    """The demo's table and its one-line reading, from the results alone (method → result, in table order; the
    last method is compared with the best of the others). Pure: the numbers decide every word."""
    per = "personal_per_task" if protocol == "personal" else "per_task"
    mean = "personal_task_mean" if protocol == "personal" else "task_mean"
    first = next(iter(results.values()))
    tasks = list(first["final_metrics"][per])
    refs = {t: first["references"][t][protocol] for t in tasks}
    header = ["", *(label(r) for r in results.values()), "majority", "chance"]
    rows, below = [], []
    for t in tasks:
        metric = first["final_metrics"][per][t]["metric_name"]
        scores = [r["final_metrics"][per][t]["score"] for r in results.values()]
        below += [f"{m} on {t}" for m, s in zip(results, scores) if s <= refs[t]["majority"]["score"]]
        rows.append([f"{t} ({metric})", *(f"{s:.3f}" for s in scores), f"{refs[t]['majority']['score']:.3f}",
                     f"{refs[t]['chance']['score']:.3f}"])
    ref_mean = {k: sum(refs[t][k]["score"] for t in tasks) / len(tasks) for k in ("majority", "chance")}
    rows.append(["task mean", *(f"{r['final_metrics'][mean]:.3f}" for r in results.values()),
                 f"{ref_mean['majority']:.3f}", f"{ref_mean['chance']:.3f}"])
    rows.append(["clusters (ARI)", *(_clusters(r) for r in results.values()), "", ""])
    rows.append(["MB sent (up + down)", *(f"{_bytes(r) / 1e6:.1f}" for r in results.values()), "", ""])
    rows.append(["seconds", *(f"{r['time_metrics']['total_s']:.0f}" for r in results.values()), "", ""])
    return Comparison(header, rows, _sentence(results, mean, protocol, below, paths))


def _clusters(result: dict) -> str:
    labels = " ".join(map(str, result["cluster_labels"]))
    ari = (result.get("phase1_clustering") or {}).get("ari")
    return labels if ari is None else f"{labels} ({ari:.2f})"


def _bytes(result: dict) -> int:
    costs = result["communication_costs"]
    return costs["total_bytes_up"] + costs["total_bytes_down"]


def _sentence(results: dict[str, dict], mean: str, protocol: str, below: list[str],
              paths: dict[str, Path] | None) -> str:
    names = list(results)
    means = {m: results[m]["final_metrics"][mean] for m in names}
    subject, baselines = names[-1], names[:-1]
    best_base = max(baselines, key=means.get)
    gap = means[subject] - means[best_base]
    verdict = (f"{label(results[subject])} is best on the {protocol} task mean, {means[subject]:.3f}, "
               f"{gap:+.3f} against the best baseline ({best_base}, {means[best_base]:.3f})" if gap > 0 else
               f"{label(results[subject])} is not best on the {protocol} task mean: {means[subject]:.3f}, "
               f"{gap:+.3f} against {best_base} ({means[best_base]:.3f})")
    learned = ("every score is above its task's majority reference" if not below else
               f"not above the majority reference: {', '.join(below)}")
    where = ""
    if paths:
        folder = Path(next(iter(paths.values()))).parent
        where = f"; result files in {folder}/, compared in full by `atlas report {folder}`"
    return f"{verdict}; {learned}{where}."
