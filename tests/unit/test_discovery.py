"""The report's task-discovery table: rounds until the clusters are right for good, and the bytes spent until
then, on constructed runs whose answers are counted by hand."""
from pathlib import Path

import pytest

from atlasfl.methods import METHODS
from atlasfl.report.records import RunRecord
from atlasfl.report.tables import build_tables, bytes_until_right, discovery_table, group_runs, rounds_until_right


def _run(method: str, seed: int, *, aris=(), phase1_ari=0.5, fingerprint_bytes=0, clusters_from="training"):
    rounds = list(range(1, len(aris) + 1))
    return RunRecord(source=Path(f"{method}{seed}.json"), model="tiny-bert", method=method, seed=seed, eta=None,
                     tasks={}, task_mean=0.5, client_scores={}, client_tasks={}, rounds=rounds,
                     round_bytes=[100 * n for n in rounds], round_ari=list(aris), clustering={"ari": phase1_ari},
                     clusters_from=clusters_from, fingerprint_bytes=fingerprint_bytes)


def test_the_final_streak_of_right_rounds_counts_not_an_early_lucky_one():
    r = _run("cfl", 0, aris=[1.0, 0.2, 1.0, 1.0])
    assert rounds_until_right(r) == 3
    assert bytes_until_right(r) == 100 + 200 + 300  # rounds 1-3, no phase-1 upload


def test_clusters_wrong_at_the_end_are_never_right():
    r = _run("ifca", 0, aris=[1.0, 1.0, 0.4])
    assert rounds_until_right(r) is None and bytes_until_right(r) is None


def test_phase_one_clusters_are_right_before_round_one_at_the_cost_of_the_fingerprints():
    right = _run("fedavg_cluster", 0, aris=[None, None], phase1_ari=1.0, fingerprint_bytes=4096,
                 clusters_from="phase 1")
    wrong = _run("fedavg_cluster", 1, aris=[None, None], phase1_ari=0.6, clusters_from="phase 1")
    assert (rounds_until_right(right), bytes_until_right(right)) == (0, 4096)
    assert rounds_until_right(wrong) is None


def test_table_rows_average_over_the_runs_that_end_right():
    runs = [_run("ifca", 0, aris=[0.0, 1.0, 1.0]), _run("ifca", 1, aris=[0.5, 0.5, 1.0]),
            _run("ifca", 2, aris=[0.5, 0.5, 0.5])]
    (row,) = discovery_table(group_runs(runs)).rows
    _, _, source, n, ari, by_round, right, until, mb = row
    assert (source, n, right) == ("training", 3, "2/3")
    assert ari.mean == pytest.approx(2.5 / 3)
    assert by_round == "0.33 → 0.67 → 0.83"
    assert until.mean == pytest.approx(2.5)  # rounds 2 and 3
    assert mb.mean == pytest.approx((300 + 600) / 2 / 1e6)


def test_methods_say_where_their_clusters_come_from_and_the_table_lists_only_those_that_use_clusters():
    assert METHODS["local_only"].clusters_from({}) is None and METHODS["standard_fl"].clusters_from({}) is None
    assert METHODS["fedprox"].clusters_from({"sharing": "all"}) is None
    assert METHODS["fedprox"].clusters_from({"sharing": "cluster"}) == "phase 1"
    assert METHODS["atlas"].clusters_from({}) == "phase 1"
    assert METHODS["ifca"].clusters_from({}) == METHODS["cfl"].clusters_from({}) == "training"
    runs = [_run("standard_fl", 0, clusters_from=None), _run("cfl", 0, aris=[1.0])]
    tables = {t.key: t for t in build_tables(runs)}
    assert [row[1] for row in tables["discovery"].rows] == ["cfl"]
    assert "discovery" not in {t.key for t in build_tables(runs[:1])}


def test_a_second_look_that_mends_phase_one_makes_the_clusters_right_from_round_one():
    mended = _run("fedavg_cluster", 0, aris=[None, None], phase1_ari=0.6, fingerprint_bytes=4096,
                  clusters_from="phase 1")
    mended.second_look = {"changed": True, "ari": 1.0}
    kept = _run("fedavg_cluster", 1, aris=[None, None], phase1_ari=1.0, clusters_from="phase 1")
    kept.second_look = {"changed": False, "ari": 1.0}
    assert (rounds_until_right(mended), bytes_until_right(mended)) == (1, 4096 + 100)  # phase 1 and round 1
    assert rounds_until_right(kept) == 0
    (row,) = discovery_table(group_runs([mended, kept])).rows
    assert row[2] == "phase 1, second look changed 1/2" and row[4].mean == 1.0 and row[6] == "2/2"
