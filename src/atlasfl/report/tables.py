"""The report's tables as data (renderers in `render`): scores per task, costs, and paired comparisons
of every method against a baseline, each over the seeds of one model × method (× η) group."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from atlasfl.config import METHODS
from atlasfl.errors import AtlasError
from atlasfl.report.records import PROTOCOLS, RunRecord, TaskScore, in_protocol
from atlasfl.report.stats import Stat, mean_std, paired_test

MB = 1e6
METRIC_SHORT = {"accuracy": "acc", "f1": "F1", "mcc": "MCC"}
METHOD_ORDER = METHODS  # baselines first, atlas last, as in docs/design.md §2


@dataclass(frozen=True)
class Column:
    name: str
    fmt: str = "{}"  # applied to numbers, and to both parts of a Stat


@dataclass
class Table:
    key: str  # file stem of its CSV
    title: str
    columns: list[Column]
    rows: list[list[Any]]  # cells: str, int, float, Stat or None (shown as "—")
    notes: list[str] = field(default_factory=list)


@dataclass
class Group:
    """The runs of one model × method (× η), one per seed."""

    model: str
    method: str
    eta: str | None
    runs: list[RunRecord]

    @property
    def label(self) -> str:
        return self.runs[0].method_label

    @property
    def by_seed(self) -> dict[int, RunRecord]:
        return {r.seed: r for r in self.runs}


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Groups in a stable order (model, then baselines before atlas); two files for one seed are an error."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.method, r.eta), []).append(r)
    for (model, _method, _), runs in groups.items():
        seen: dict[int, RunRecord] = {}
        for r in runs:
            if r.seed in seen:
                raise AtlasError(f"two results for {model} {r.method_label} seed {r.seed}: {seen[r.seed].source} and "
                                 f"{r.source}; pass only one of them")
            seen[r.seed] = r

    def order(key: tuple) -> tuple:
        model, method, eta = key
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return model, rank, method, _as_number(eta)

    return [Group(*key, sorted(groups[key], key=lambda r: r.seed)) for key in sorted(groups, key=order)]


def _as_number(eta: str | None) -> float:
    try:
        return float(eta) if eta is not None else -1.0
    except ValueError:  # 'sweep' after every fixed η
        return math.inf


PROTOCOL_NOTES = {
    "global": "global protocol: each client on its task's whole test set (GLUE's validation split for GLUE tasks)",
    "personal": "personal protocol: each client on its personal test set, the rows of its task's test set whose "
                "label mix follows its own training shard (schema 1.2 on; runs without it are left out)",
}


def build_tables(records: list[RunRecord], baselines: Sequence[str] = ("local_only",),
                 protocols: tuple[str, ...] = PROTOCOLS) -> list[Table]:
    """Scores and paired comparisons (against each baseline) on each protocol asked for, and the costs (the
    same on both)."""
    views = {p: [v for r in records if (v := in_protocol(r, p)) is not None] for p in protocols}
    views = {p: groups for p, recs in views.items() if (groups := group_runs(recs))}
    groups = group_runs(records)
    sweep = [sweep_table(groups)] if any(g.eta == "sweep" for g in groups) else []
    discovery = [discovery_table(groups)] if any(r.clusters_from for g in groups for r in g.runs) else []
    return [*(scores_table(g, p) for p, g in views.items()), costs_table(groups), *discovery, *sweep,
            *(paired_table(g, b, p, key=_paired_key(b, baselines)) for b in dict.fromkeys(baselines)
              for p, g in views.items())]


def _paired_key(baseline: str, baselines: Sequence[str]) -> str:
    """The first baseline's tables keep the name `paired`; the others are `paired_vs_<baseline>`."""
    return "paired" if baseline == baselines[0] else f"paired_vs_{baseline}"


def _key(stem: str, protocol: str) -> str:
    """File stems: the global protocol keeps the names of reports before the personal protocol existed."""
    return stem if protocol == "global" else f"{stem}_{protocol}"


def _task_columns(groups: list[Group]) -> list[tuple[str, str]]:
    """(task, metric) pairs: each task's GLUE metric, and accuracy beside F1 (GLUE reports MRPC as F1/acc)."""
    metrics: dict[str, list[str]] = {}
    for r in (r for g in groups for r in g.runs):
        for task, s in r.tasks.items():
            seen = metrics.setdefault(task, [])
            if s.metric not in seen:
                seen.append(s.metric)
    columns = []
    for task, seen in metrics.items():
        if "f1" in seen and "accuracy" not in seen:
            seen.append("accuracy")
        columns += [(task, m) for m in sorted(seen, key=lambda m: m == "accuracy")]
    return columns


def _task_value(r: RunRecord, task: str, metric: str) -> float | None:
    return _value(r.tasks.get(task), metric)


def _value(s: TaskScore | None, metric: str) -> float | None:
    """A column's number from a task's scores: its accuracy, or its GLUE metric if that is the column's."""
    if s is None:
        return None
    if metric == "accuracy":
        return s.accuracy
    return s.score if s.metric == metric else None


def _stat(values) -> Stat | None:
    return mean_std(v for v in values if v is not None)


REFERENCE_ROWS = (("majority", "majority class (reference)"), ("chance", "chance (reference)"))


def scores_table(groups: list[Group], protocol: str = "global") -> Table:
    task_cols = _task_columns(groups)
    columns = [Column("model"), Column("method"), Column("n"),
               *(Column(f"{t} ({METRIC_SHORT.get(m, m)})", "{:.4f}") for t, m in task_cols),
               Column("task mean", "{:.4f}"), Column("diverged")]
    rows = []
    for model in dict.fromkeys(g.model for g in groups):
        mine = [g for g in groups if g.model == model]
        rows += [[g.model, g.label, len(g.runs),
                  *(_stat(_task_value(r, t, m) for r in g.runs) for t, m in task_cols),
                  _stat(r.task_mean for r in g.runs), sum(len(r.diverged) for r in g.runs)] for g in mine]
        rows += _reference_rows(model, [r for g in mine for r in g.runs], task_cols)
    notes = [f"Each task's GLUE metric (acc; F1 of the positive class; MCC) at the last round on the "
             f"{PROTOCOL_NOTES[protocol]}, mean of the task's clients; cells are mean ± sample std over seeds, n = "
             "seeds; task mean = mean of the task scores; diverged = clients whose training diverged, summed over "
             "seeds (their scores are in the means)."]
    if any(r.references for g in groups for r in g.runs):
        notes.append("Reference rows (mean ± std over the model's runs that record them, n = runs): majority class = "
                     "always predicting the majority label of the training data (global: the task's training pool; "
                     "personal: each client's own shard, mean over clients); chance = uniform random guessing, from "
                     "expected counts (acc 1/K, F1 2p/(2p+1) for positive-class prevalence p, MCC 0).")
    notes += [f"DIVERGED: {g.model} {g.label} seed {r.seed}: client(s) {', '.join(map(str, r.diverged))} "
              f"({r.source.name})." for g in groups for r in g.runs if r.diverged]
    for note, count in Counter(r.note for g in groups for r in g.runs if r.note).items():
        notes.append(f"{count} file(s) in the {note}.")
    notes += privacy_notes(groups)
    return Table(_key("scores", protocol), f"Test scores per task, {protocol} protocol", columns, rows, notes)


def privacy_notes(groups: list[Group]) -> list[str]:
    """One note per DP group (`--dp-clip`, its label `dp<mode>C<clip>z<noise>`): the ε its runs spent, and that it
    covers the training rounds only."""
    notes = []
    for g in groups:
        spent = [r.privacy for r in g.runs if r.privacy is not None]
        if spent:
            eps = sorted({"∞" if p["epsilon_infinite"] else f"{p['epsilon']:.3g}" for p in spent})
            stopped = sum(p["stopped_by_budget"] for p in spent)
            notes.append(f"DP {g.model} {g.label}: ε = {' / '.join(eps)} at δ = {spent[0]['delta']:g} "
                         f"({spent[0]['neighbouring']}), the training rounds only: phase 1's fingerprints are "
                         "released without noise" + (f"; {stopped} run(s) stopped by the ε budget" if stopped else "")
                         + ".")
    return notes


def _reference_rows(model: str, runs: list[RunRecord], task_cols: list[tuple[str, str]]) -> list[list[Any]]:
    """The majority-class and chance rows of a model's block, over each of its distinct runs' references."""
    refs = {(r.seed, r.source): r.references for r in runs if r.references}  # a sweep's two records: one file
    if not refs:
        return []
    rows = []
    for kind, label in REFERENCE_ROWS:
        cells = [_stat(_value(ref.get(t, {}).get(kind), m) for ref in refs.values()) for t, m in task_cols]
        means = [sum(ref[t][kind].score for t in ref) / len(ref) for ref in refs.values()]
        rows.append([model, label, len(refs), *cells, _stat(means), None])
    return rows


def _div(x: float | None, by: float) -> float | None:
    return None if x is None else x / by


PHASE_COLUMNS = ("train", "aggregate", "evaluate")


def _flagged(runs) -> str | None:
    """'flagged of recorded' runs whose phase 1 was ambiguous (docs/clustering.md); None where none records it."""
    recorded = [r.clustering["ambiguous"] for r in runs if r.clustering.get("ambiguous") is not None]
    return f"{sum(recorded)}/{len(recorded)}" if recorded else None


def costs_table(groups: list[Group]) -> Table:
    columns = [Column("model"), Column("method"), Column("n"), Column("up (MB)", "{:.3f}"),
               Column("down (MB)", "{:.3f}"), Column("time (s)", "{:.1f}"),
               *(Column(f"{p} s/round", "{:.2f}") for p in PHASE_COLUMNS),
               Column("padding %", "{:.0f}"), Column("peak mem (MB)", "{:.0f}"), Column("participants/round", "{:.1f}"),
               Column("simulated s/round", "{:.3g}"), Column("ARI", "{:.2f}"), Column("k"), Column("ambiguous")]
    rows = []
    for g in groups:
        ks = sorted({r.clustering["k"] for r in g.runs if "k" in r.clustering})
        rows.append([g.model, g.label, len(g.runs),
                     _stat(_div(r.bytes_up, MB) for r in g.runs), _stat(_div(r.bytes_down, MB) for r in g.runs),
                     _stat(r.time_s for r in g.runs),
                     *(_stat((r.round_phase_s or {}).get(p) for r in g.runs) for p in PHASE_COLUMNS),
                     _stat(None if r.padding_share is None else 100 * r.padding_share for r in g.runs),
                     _stat(_div(r.peak_memory_bytes, MB) for r in g.runs), _stat(r.participants for r in g.runs),
                     _stat(r.simulated_round_s for r in g.runs), _stat(r.clustering.get("ari") for r in g.runs),
                     ", ".join(map(str, ks)) or None,
                     _flagged(g.runs)])
    notes = ["Communication: total bytes sent over all clients and rounds (fingerprints included), MB = 10^6 bytes; "
             "time: wall time of the run; s/round: mean seconds per trained round of each phase (aggregate: "
             "aggregation or the Laplacian step); padding %: share of the token positions computed in training "
             "and evaluation that are padding; peak mem: measured peak; participants/round: mean clients per round "
             "whose training was aggregated, and simulated s/round: the mean round on the device profiles' "
             "SIMULATED clock, an estimate (docs/scale.md); ARI and k of the fingerprint clustering "
             "(every method runs phase 1, though local_only and standard_fl do not use its clusters; — where a file "
             "does not record it); ambiguous: runs whose phase 1 found that the next larger k also fits, of those "
             "that record the test (docs/clustering.md); mean ± sample std over seeds."]
    sweeps = sum(r.sweep_totals for g in groups for r in g.runs)
    if sweeps:
        notes.append(f"{sweeps} run(s) chose η by a lambda sweep: their bytes, time and s/round cover every η of the "
                     "grid (the sweep trained and sent them all), not only the chosen η's run.")
    return Table("costs", "Communication, time, memory and clustering", columns, rows, notes)


RIGHT = 1 - 1e-9  # an ARI of 1: the clusters are the tasks


def refined(r: RunRecord) -> bool:
    """Whether the second look after round 1 changed phase 1's clusters (its partition groups from round 2 on)."""
    return bool(r.second_look and r.second_look.get("changed"))


def phase_one_ari(r: RunRecord) -> float | None:
    """The ARI of the clusters a phase-1 run shares in at its end: the second look's where it changed them."""
    return r.second_look["ari"] if refined(r) else r.clustering.get("ari")


def rounds_until_right(r: RunRecord) -> int | None:
    """The round from which a run's clusters are the tasks and stay so to its end: 0 for phase 1's clusters (fixed
    before round 1), 1 for the second look's (made from round 1's uploads), else the first round of the final
    streak of rounds at ARI 1; None when they are not right at the end."""
    if r.clusters_from == "phase 1":
        return (1 if refined(r) else 0) if (phase_one_ari(r) or 0.0) >= RIGHT else None
    streak = 0
    for ari in reversed(r.round_ari):
        if ari is None or ari < RIGHT:
            break
        streak += 1
    return r.rounds[len(r.rounds) - streak] if streak else None


def bytes_until_right(r: RunRecord) -> int | None:
    """Bytes up and down of every client until the clusters were right for good: phase 1's upload (where the method
    uses it) and every round up to that one."""
    right = rounds_until_right(r)
    if right is None:
        return None
    return (r.fingerprint_bytes or 0) + sum(b for n, b in zip(r.rounds, r.round_bytes) if n <= right)


def discovery_table(groups: list[Group]) -> Table:
    """Who finds the tasks, how fast, at what cost: every method that shares inside clusters, by where they come
    from (phase 1's fingerprints or the training rounds), with the ARI by round and the traffic until right."""
    columns = [Column("model"), Column("method"), Column("clusters from"), Column("n"),
               Column("ARI", "{:.2f}"), Column("ARI by round"), Column("right at the end"),
               Column("rounds until right", "{:.1f}"), Column("MB until right", "{:.3f}")]
    rows = []
    for g in (g for g in groups if g.runs[0].clusters_from):
        source = g.runs[0].clusters_from
        if source == "phase 1" and any(map(refined, g.runs)):
            source = f"phase 1, second look changed {sum(map(refined, g.runs))}/{len(g.runs)}"
        right = [r for r in g.runs if rounds_until_right(r) is not None]
        if g.runs[0].clusters_from == "phase 1":
            ari, by_round = _stat(phase_one_ari(r) for r in g.runs), None
        else:
            ari = _stat(r.round_ari[-1] if r.round_ari else None for r in g.runs)
            per_round = [[a for a in column if a is not None] for column in zip(*(r.round_ari for r in g.runs))]
            by_round = " → ".join(f"{sum(c) / len(c):.2f}" if c else "—" for c in per_round) or None
        rows.append([g.model, g.label, source, len(g.runs), ari, by_round, f"{len(right)}/{len(g.runs)}",
                     _stat(rounds_until_right(r) for r in right), _stat(_div(bytes_until_right(r), MB) for r in right)])
    notes = ["Clusters from phase 1 are fixed before round 1 (ARI: phase 1's against the true tasks, or the second "
             "look's where it changed them after round 1: right from round 1 then); those found in "
             "training change each round (ARI: at the last round; ARI by round: the mean over seeds at each round). "
             "Right at the end: runs whose clusters are the tasks (ARI 1) at the last round; rounds until right: "
             "the round from which they stay right (0: phase 1's); MB until right: bytes up and down of all "
             "clients until then, phase 1's upload included where the method uses it (MB = 10^6 bytes); both over "
             "the runs that end right, mean ± sample std over seeds."]
    return Table("discovery", "Task discovery: who finds the tasks, how fast, at what cost", columns, rows, notes)


def sweep_table(groups: list[Group]) -> Table:
    """Every η of each model's lambda sweeps: its run's mean local-validation and test scores over seeds, how
    often the shared rule chose it, and the share of clients the per-client rule gave it."""
    columns = [Column("model"), Column("η"), Column("n"), Column("validation", "{:.4f}"),
               Column("test, global", "{:.4f}"), Column("test, personal", "{:.4f}"), Column("chosen (shared)"),
               Column("clients (per client) %", "{:.0f}")]
    rows = []
    for g in (g for g in groups if g.eta == "sweep"):
        sweeps = [r.lambda_sweep for r in g.runs if r.lambda_sweep and r.lambda_sweep.get("grid")]
        etas = [e for sw in sweeps for e in sw.get("selections", {}).get("per_client", {}).get("etas", {}).values()]
        for eta in sorted({e for sw in sweeps for e in sw["grid"]}):
            at = [(sw, sw["grid"].index(eta)) for sw in sweeps if eta in sw["grid"]]
            rows.append([g.model, f"{eta:g}", len(at), _stat(sw["val_scores"][i] for sw, i in at),
                         _stat(sw["test_scores"][i] for sw, i in at),
                         _stat(sw["personal_test_scores"][i] for sw, i in at),
                         f"{sum(sw['selected_eta'] == eta for sw, _ in at)} of {len(at)}",
                         100 * etas.count(eta) / len(etas) if etas else None])
    notes = ["Each η's federation of the lambda sweeps, mean ± sample std over seeds: mean local-validation score "
             "(what the shared rule maximises), and the task-mean test score on each protocol at the last round "
             "(never used for a choice); chosen (shared): seeds whose shared rule picked this η; clients (per "
             "client): share of all clients over seeds whose own validation picked it."]
    return Table("lambda_sweep", "Lambda sweep: every η", columns, rows, notes)


def paired_table(groups: list[Group], baseline: str, protocol: str = "global", key: str = "paired") -> Table:
    """Each method against the baseline of the same model: over seeds (task mean) and over (seed, client)."""
    columns = [Column("model"), Column("method"), Column("baseline"), Column("paired over"), Column("n"),
               Column("mean diff", "{:+.4f}"), Column("t-test p", "{:.4f}"), Column("Wilcoxon p", "{:.4f}"),
               Column("Cohen's d_z", "{:.2f}"), Column("note")]
    rows, notes = [], []
    for model in dict.fromkeys(g.model for g in groups):
        base = [g for g in groups if g.model == model and g.method == baseline]
        if not base:
            notes.append(f"{model}: no {baseline} runs, so no paired comparisons "
                         "(choose the baseline with --baseline).")
            continue
        if len(base) > 1:
            raise AtlasError(f"{model}: the baseline {baseline} has runs with several η "
                             f"({', '.join(g.label for g in base)}); "
                             "report them separately or choose another --baseline")
        b = base[0]
        for g in (g for g in groups if g.model == model and g is not b):
            seeds = sorted(g.by_seed.keys() & b.by_seed.keys())
            ga, gb = g.by_seed, b.by_seed
            rows.append(_compare(model, g.label, b.label, "seeds",
                                 [ga[s].task_mean for s in seeds], [gb[s].task_mean for s in seeds]))
            pairs = [(s, c) for s in seeds for c in sorted(ga[s].client_scores.keys() & gb[s].client_scores.keys())]
            rows.append(_compare(model, g.label, b.label, "clients",
                                 [ga[s].client_scores[c] for s, c in pairs],
                                 [gb[s].client_scores[c] for s, c in pairs]))
    notes.append(f"Scores on the {PROTOCOL_NOTES[protocol]}. Difference = method − baseline of the task-mean score "
                 "(per seed) or of the client's GLUE metric (per seed and client id); two-sided p-values; d_z = mean "
                 "difference / sample std of differences. Clients of one run are not independent samples: read the "
                 "per-client row as descriptive.")
    return Table(_key(key, protocol), f"Paired comparisons against {baseline}, {protocol} protocol", columns,
                 rows, notes)


def _compare(model: str, label: str, baseline: str, unit: str, a: list[float], b: list[float]) -> list[Any]:
    head = [model, label, baseline, unit, len(a)]
    if len(a) < 2:
        diff = a[0] - b[0] if a else None
        return [*head, diff, None, None, None, f"fewer than 2 paired {unit} ({len(a)}): no test"]
    t = paired_test(a, b)
    note = "" if not math.isnan(t.cohens_d) else "differences do not vary: t-test and d_z undefined"
    return [*head, t.mean_diff, t.t_p, t.wilcoxon_p, t.cohens_d, note]
