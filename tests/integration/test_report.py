"""`atlas report` over real result files of tiny end-to-end runs (3 seeds × 2 methods), the predecessor's
format, and the files it must refuse."""
from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from atlasfl.cli.app import main
from atlasfl.experiment import run_and_save
from atlasfl.report import schema_doc
from atlasfl.report.load import load_results
from atlasfl.report.plots import write_plots
from atlasfl.report.predecessor import NOTE
from atlasfl.report.stats import Stat
from atlasfl.report.tables import build_tables
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
PREDECESSOR = ROOT / "tests" / "fixtures" / "predecessor"
METHODS = ("local_only", "fedavg_cluster")
SEEDS = (0, 1, 2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Six real result files: tiny-bert, generated tasks, 2 rounds."""
    tmp = tmp_path_factory.mktemp("runs")
    for seed in SEEDS:
        for method in METHODS:
            run_and_save(tiny_config(tmp, method=method, seed=seed), progress=False)
    return tmp / "results"


def _load(folder: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        out[(data["method"], data["seed"])] = data
    return out


def _cell(table, method: str, column: str):
    row = next(r for r in table.rows if r[1] == method)
    return row[[c.name for c in table.columns].index(column)]


def _assert_stat(cell: Stat, values: list[float]):
    assert cell.n == len(values)
    assert cell.mean == pytest.approx(statistics.mean(values))
    assert cell.std == pytest.approx(statistics.stdev(values))


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def _tables(records, *args) -> dict:
    return {t.key: t for t in build_tables(records, ("local_only",), *args)}


def test_scores_and_costs_equal_hand_aggregates(results):
    runs = _load(results)
    tables = _tables(load_results([results]))
    scores, costs = tables["scores"], tables["costs"]
    assert [r[1] for r in scores.rows] == [*METHODS, "majority class (reference)", "chance (reference)"]
    for method in METHODS:
        mine = [runs[(method, s)] for s in SEEDS]
        assert _cell(scores, method, "n") == 3
        for task, m in mine[0]["final_metrics"]["per_task"].items():
            column = f"{task} ({ {'accuracy': 'acc', 'f1': 'F1', 'mcc': 'MCC'}[m['metric_name']] })"
            _assert_stat(_cell(scores, method, column), [r["final_metrics"]["per_task"][task]["score"] for r in mine])
        _assert_stat(_cell(scores, method, "task mean"), [r["final_metrics"]["task_mean"] for r in mine])
        _assert_stat(_cell(costs, method, "up (MB)"), [r["communication_costs"]["total_bytes_up"] / 1e6 for r in mine])
        _assert_stat(_cell(costs, method, "down (MB)"),
                     [r["communication_costs"]["total_bytes_down"] / 1e6 for r in mine])
        _assert_stat(_cell(costs, method, "time (s)"), [r["time_metrics"]["total_s"] for r in mine])
        _assert_stat(_cell(costs, method, "peak mem (MB)"), [r["memory"]["peak_measured_bytes"] / 1e6 for r in mine])
        clustering = [r["phase1_clustering"] for r in mine if r.get("phase1_clustering")]
        if clustering:
            _assert_stat(_cell(costs, method, "ARI"), [c["ari"] for c in clustering])
            assert _cell(costs, method, "k") == ", ".join(map(str, sorted({c["k"] for c in clustering})))
        else:
            assert _cell(costs, method, "ARI") is None and _cell(costs, method, "k") is None


def test_paired_comparisons_pair_seeds_and_clients(results):
    runs = _load(results)
    paired = _tables(load_results([results]))["paired"]
    by_unit = {row[3]: row for row in paired.rows}
    assert set(by_unit) == {"seeds", "clients"}
    seed_diffs = [runs[("fedavg_cluster", s)]["final_metrics"]["task_mean"]
                  - runs[("local_only", s)]["final_metrics"]["task_mean"] for s in SEEDS]
    assert by_unit["seeds"][1:5] == ["fedavg_cluster", "local_only", "seeds", 3]
    assert by_unit["seeds"][5] == pytest.approx(statistics.mean(seed_diffs))
    client_diffs = [runs[("fedavg_cluster", s)]["final_metrics"]["per_client"][c]["score"]
                    - runs[("local_only", s)]["final_metrics"]["per_client"][c]["score"]
                    for s in SEEDS for c in runs[("local_only", s)]["final_metrics"]["per_client"]]
    assert by_unit["clients"][4] == len(client_diffs) == 12
    assert by_unit["clients"][5] == pytest.approx(statistics.mean(client_diffs))


def test_each_baseline_gets_its_own_paired_table(results, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out), "--baseline", "local_only", "fedavg_cluster"]) == 0
    tables = {t.key: t for t in build_tables(load_results([results]), ("local_only", "fedavg_cluster"))}
    first, second = tables["paired"], tables["paired_vs_fedavg_cluster"]
    assert {row[2] for row in first.rows} == {"local_only"} and {row[2] for row in second.rows} == {"fedavg_cluster"}
    # the same pair seen from either side: the difference changes sign
    assert _cell(second, "local_only", "mean diff") == pytest.approx(-_cell(first, "fedavg_cluster", "mean diff"))
    assert (out / "paired.csv").exists() and (out / "paired_vs_fedavg_cluster.csv").exists()
    quoted = tmp_path / "quoted"  # one argument holding both, as a shell user quotes them
    assert main(["report", str(results), "--out", str(quoted), "--baseline", "local_only fedavg_cluster"]) == 0
    assert (quoted / "paired_vs_fedavg_cluster.csv").read_text() == (out / "paired_vs_fedavg_cluster.csv").read_text()


def test_cli_writes_every_format_and_plot(results, tmp_path, capsys):
    out, plots = tmp_path / "report", tmp_path / "plots"
    assert main(["report", str(results), "--out", str(out), "--plots", str(plots)]) == 0
    assert "Test scores per task" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    scores, *_ = build_tables(load_results([results]), ("local_only",))
    task_mean = _cell(scores, "fedavg_cluster", "task mean")
    assert f"{task_mean.mean:.4f} ± {task_mean.std:.4f}" in md
    assert r"\begin{tabular}" in (out / "report.tex").read_text()
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["task mean"]) == pytest.approx(task_mean.mean)
    assert float(rows[1]["task mean std"]) == pytest.approx(task_mean.std)
    for name in ("costs.csv", "paired.csv"):
        assert (out / name).stat().st_size > 0
    written = {p.name for p in plots.iterdir()}
    assert {"curves_tiny-bert.png", "score_vs_comm_tiny-bert.png", "heatmap_tiny-bert_local_only.png",
            "heatmap_tiny-bert_fedavg_cluster.png"} <= written
    assert all(_is_png(plots / name) for name in written)


def test_similarity_and_lambda_sweep_plots(results, tmp_path):
    data = json.loads(next(results.glob("*fedavg_cluster_seed0*.json")).read_text())
    data["phase1_clustering"] = {"k": 2, "ari": 1.0, "labels": [0, 1, 0, 1],
                                 "similarity": [[1, -0.8, 0.9, -0.7], [-0.8, 1, -0.9, 0.8],
                                                [0.9, -0.9, 1, -0.6], [-0.7, 0.8, -0.6, 1]]}
    data["lambda_sweep"] = {"grid": [0.0, 0.01, 0.1, 1.0], "val_scores": [0.5, 0.55, 0.6, 0.52],
                            "test_scores": [0.48, 0.5, 0.58, 0.5], "selected_eta": 0.1}
    path = tmp_path / "with_extras.json"
    path.write_text(json.dumps(data))
    written = {p.name: p for p in write_plots(load_results([path]), tmp_path / "plots")}
    expected = {"similarity_tiny-bert_fedavg_cluster_seed0.png", "lambda_tiny-bert_fedavg_cluster_seed0.png"}
    assert expected <= set(written)
    assert all(_is_png(p) for p in written.values())


def test_plots_skip_quietly_what_results_do_not_hold(tmp_path):
    """The predecessor files hold no similarity matrix or lambda sweep, and one of them no per-round scores."""
    written = write_plots(load_results([PREDECESSOR]), tmp_path)
    assert sorted(p.name for p in written) == ["curves_distilbert-base-uncased.png",
                                               "heatmap_distilbert-base-uncased_atlas.png",
                                               "score_vs_comm_distilbert-base-uncased.png"]


def test_predecessor_files_are_read(tmp_path):
    records = {r.seed: r for r in load_results([PREDECESSOR])}
    assert set(records) == {42, 123}
    r = records[42]
    assert (r.model, r.method, r.eta) == ("distilbert-base-uncased", "atlas", None)
    assert r.tasks["sst2"].score == pytest.approx((0.80 + 0.84) / 2)
    assert r.tasks["mrpc"].score == pytest.approx((0.66 + 0.70) / 2)
    assert r.tasks["mrpc"].metric == "accuracy" and r.note == NOTE
    assert r.task_mean == pytest.approx((0.82 + 0.68) / 2)
    assert r.client_tasks == {0: "sst2", 1: "sst2", 2: "mrpc", 3: "mrpc"}
    assert r.round_task_scores[0] == pytest.approx({"sst2": 0.71, "mrpc": 0.61})
    assert (r.bytes_up, r.bytes_down, r.time_s) == (2_000_000, 1_000_000, 120.5)
    assert records[123].rounds == [] and records[123].bytes_up is None  # only avg_accuracy; no costs
    out = tmp_path / "out"
    assert main(["report", str(PREDECESSOR), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "0.7300 ± 0.0283" in md and "predecessor format" in md  # task means 0.75 and 0.71


def test_fewer_than_two_paired_seeds_gives_a_message(results, tmp_path):
    files = [str(next(results.glob(f"*{m}_seed0_*.json"))) for m in METHODS]
    assert main(["report", *files, "--out", str(tmp_path)]) == 0
    assert "fewer than 2 paired seeds (1): no test" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("content", ['{"hello": "world"}', "not json at all", "[1, 2, 3]"])
def test_file_of_neither_format_is_a_one_line_error(tmp_path, capsys, content):
    junk = tmp_path / "junk.json"
    junk.write_text(content)
    _one_line_error(capsys, main(["report", str(junk), "--out", str(tmp_path / "out")]), str(junk))


def test_unknown_schema_version_is_refused(results, tmp_path, capsys):
    data = json.loads(next(results.glob("*.json")).read_text())
    data["schema_version"] = "99.0"
    future = tmp_path / "future.json"
    future.write_text(json.dumps(data))
    _one_line_error(capsys, main(["report", str(future)]), "future.json", "schema version", "99.0")


def test_two_files_for_one_seed_are_refused(results, tmp_path, capsys):
    original = next(results.glob("*local_only_seed0*.json"))
    shutil.copy(original, tmp_path / "copy.json")
    _one_line_error(capsys, main(["report", str(original), str(tmp_path / "copy.json")]), "two results", "seed 0")


def test_missing_path_is_a_one_line_error(tmp_path, capsys):
    _one_line_error(capsys, main(["report", str(tmp_path / "nope")]), "no such result file")


def test_committed_schema_doc_is_the_generated_one():
    hint = "docs are stale: run `python -m atlasfl.report.schema_doc`"
    assert (ROOT / "docs" / "result-schema.md").read_text(encoding="utf-8") == schema_doc.render(), hint
    assert (ROOT / "docs" / "result-schema.json").read_text(encoding="utf-8") == schema_doc.render_json(), hint


# ---- both protocols, references and per-client η, from real runs ------------------------------
SWEEP_SEEDS = (0, 1)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    """local_only and atlas with a lambda sweep, under Dirichlet label skew: tiny-bert, generated tasks, 1 round."""
    tmp = tmp_path_factory.mktemp("skewed")
    for seed in SWEEP_SEEDS:
        common = dict(seed=seed, rounds=1, dirichlet_alpha=0.5)
        run_and_save(tiny_config(tmp, method="local_only", **common), progress=False)
        run_and_save(tiny_config(tmp, method="atlas", lambda_sweep=True, lambda_grid=(0.0, 0.5), **common),
                     progress=False)
    return tmp / "results"


def test_report_shows_both_protocols_references_and_the_per_client_eta_row(skewed):
    runs = _load(skewed)
    tables = _tables(load_results([skewed]))
    assert {"scores", "scores_personal", "costs", "discovery", "lambda_sweep", "paired",
            "paired_personal"} == set(tables)
    per_client_label = "atlas (η=per client)"
    for key, prefix in (("scores", ""), ("scores_personal", "personal_")):
        table = tables[key]
        assert [r[1] for r in table.rows] == ["local_only", "atlas (η=sweep)", per_client_label,
                                              "majority class (reference)", "chance (reference)"]
        sweeps = [runs[("atlas", s)]["lambda_sweep"]["selections"] for s in SWEEP_SEEDS]
        _assert_stat(_cell(table, per_client_label, "task mean"),
                     [x["per_client"]["final_metrics"][f"{prefix}task_mean"] for x in sweeps])
        _assert_stat(_cell(table, "atlas (η=sweep)", "task mean"),
                     [x["shared"]["final_metrics"][f"{prefix}task_mean"] for x in sweeps])
        protocol = "personal" if prefix else "global"
        refs = [runs[(m, s)]["references"] for m in ("local_only", "atlas") for s in SWEEP_SEEDS]
        for task in refs[0]:
            column = next(c.name for c in table.columns if c.name.startswith(f"{task} ("))
            _assert_stat(_cell(table, "majority class (reference)", column),
                         [r[task][protocol]["majority"]["score"] for r in refs])
    # the personal protocol follows each client's skewed mix: its majority-class score is not the global one
    assert (_cell(tables["scores_personal"], "majority class (reference)", "task mean").mean
            != _cell(tables["scores"], "majority class (reference)", "task mean").mean)
    paired = tables["paired_personal"]
    row = next(r for r in paired.rows if r[1] == per_client_label and r[3] == "seeds")
    diffs = [runs[("atlas", s)]["lambda_sweep"]["selections"]["per_client"]["final_metrics"]["personal_task_mean"]
             - runs[("local_only", s)]["final_metrics"]["personal_task_mean"] for s in SWEEP_SEEDS]
    assert row[4] == 2 and row[5] == pytest.approx(statistics.mean(diffs))
    assert set(_tables(load_results([skewed]), ("personal",))) == {"scores_personal", "costs", "discovery",
                                                                   "lambda_sweep", "paired_personal"}
    # The sweep table: every η's scores over seeds, the shared choices and the per-client shares, by hand.
    sweep = tables["lambda_sweep"]
    assert [r[1] for r in sweep.rows] == ["0", "0.5"]
    raw = [runs[("atlas", s)]["lambda_sweep"] for s in SWEEP_SEEDS]
    per_client = [e for x in raw for e in x["selections"]["per_client"]["etas"].values()]
    for i, eta in enumerate((0.0, 0.5)):
        row = sweep.rows[i]
        _assert_stat(row[3], [x["val_scores"][i] for x in raw])
        _assert_stat(row[4], [x["test_scores"][i] for x in raw])
        _assert_stat(row[5], [x["personal_test_scores"][i] for x in raw])
        assert row[6] == f"{sum(x['selected_eta'] == eta for x in raw)} of {len(raw)}"
        assert row[7] == pytest.approx(100 * per_client.count(eta) / len(per_client))


def test_cli_renders_both_protocols_and_their_plots(skewed, tmp_path):
    out, plots = tmp_path / "report", tmp_path / "plots"
    assert main(["report", str(skewed), "--out", str(out), "--plots", str(plots)]) == 0
    md = (out / "report.md").read_text()
    for needle in ("Test scores per task, global protocol", "Test scores per task, personal protocol",
                   "Paired comparisons against local_only, personal protocol", "majority class (reference)",
                   "chance (reference)", "atlas (η=per client)"):
        assert needle in md
    assert {"scores_personal.csv", "paired_personal.csv"} <= {p.name for p in out.iterdir()}
    written = {p.name for p in plots.iterdir()}
    assert {"curves_tiny-bert.png", "curves_tiny-bert_personal.png", "score_vs_comm_tiny-bert_personal.png",
            "heatmap_tiny-bert_local_only_personal.png", "lambda_tiny-bert_atlas_sweep_seed0.png"} <= written
    assert all(_is_png(plots / name) for name in written)


def test_results_of_schema_1_1_still_load_with_the_global_protocol_alone(results, tmp_path):
    data = json.loads(next(results.glob("*fedavg_cluster_seed0*.json")).read_text())
    data["schema_version"] = "1.1"
    del data["references"], data["final_metrics"]["personal_per_task"], data["final_metrics"]["personal_task_mean"]
    for entry in data["round_metrics"]:
        del entry["personal_task_scores"], entry["mean_personal_task_score"]
        for c in entry["clients"]:
            for key in [k for k in c if k.startswith("personal_")]:
                del c[key]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    tables = _tables(load_results([old]))
    assert set(tables) == {"scores", "costs", "discovery", "paired"}
    assert [r[1] for r in tables["scores"].rows] == ["fedavg_cluster"]  # no references recorded: no reference rows


def test_divergence_is_visible_in_the_scores_table(results, tmp_path, capsys):
    folder = tmp_path / "runs"
    shutil.copytree(results, folder)
    path = next(p for p in folder.glob("*fedavg_cluster_seed1*.json"))
    data = json.loads(path.read_text())
    data["diverged_clients"] = [1, 3]
    for cid in ("1", "3"):
        data["final_metrics"]["per_client"][cid]["diverged"] = True
    path.write_text(json.dumps(data))
    scores, *_ = build_tables(load_results([folder]), ("local_only",))
    assert (_cell(scores, "fedavg_cluster", "diverged"), _cell(scores, "local_only", "diverged")) == (2, 0)
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    line = f"DIVERGED: tiny-bert fedavg_cluster seed 1: client(s) 1, 3 ({path.name})."
    assert "DIVERGED: tiny-bert fedavg_cluster seed 1" in capsys.readouterr().out
    assert line in (tmp_path / "report" / "report.md").read_text()
