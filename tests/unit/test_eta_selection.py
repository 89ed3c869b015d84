"""Choosing η after a lambda sweep: on the clients' local validation, never on the test set (docs/design.md §1,
§3.4)."""
from __future__ import annotations

import pytest

from atlasfl.federation.records import eta_run, select_eta, select_eta_per_client


def _run(eta, val_scores, test_score):
    rounds = [dict(round=1, mean_task_score=test_score)]
    return eta_run(eta, rounds, {cid: dict(score=s) for cid, s in enumerate(val_scores)})


def test_select_eta_follows_validation_where_test_prefers_another_eta():
    runs = [_run(0.0, [0.60, 0.70], test_score=0.90),  # best on test
            _run(0.1, [0.80, 0.90], test_score=0.50),  # best on local validation (mean 0.85)
            _run(1.0, [0.90, 0.70], test_score=0.70)]  # best single client, mean 0.80
    chosen, sweep = select_eta(runs)
    assert chosen is runs[1] and sweep["selected_eta"] == 0.1
    assert sweep["val_scores"] == pytest.approx([0.65, 0.85, 0.80]) and sweep["test_scores"] == [0.90, 0.50, 0.70]
    assert "validation" in sweep["selection"]


def test_select_eta_breaks_ties_towards_the_smaller_eta_and_reports_no_sweep_for_one_eta():
    runs = [_run(0.5, [0.7], 0.1), _run(0.05, [0.7], 0.9), _run(1.0, [0.7], 0.5)]
    chosen, sweep = select_eta(runs)
    assert chosen["eta"] == 0.05 and sweep["selected_eta"] == 0.05  # the smaller eta, whatever the grid's order
    chosen, sweep = select_eta([_run(0.1, [0.3], 0.4)])
    assert chosen["eta"] == 0.1 and sweep is None


def test_per_client_selection_follows_each_clients_own_validation_not_the_test_set():
    # client 0 validates best at eta 0.1, client 1 at eta 1.0; the test sets (rounds) prefer eta 0.0
    runs = [_run(0.0, [0.60, 0.50], test_score=0.90), _run(0.1, [0.80, 0.60], test_score=0.50),
            _run(1.0, [0.70, 0.90], test_score=0.70)]
    chosen = select_eta_per_client(runs)
    assert chosen[0] is runs[1] and chosen[1] is runs[2]
    ties = [_run(0.5, [0.7], 0.1), _run(0.05, [0.7], 0.9)]
    assert select_eta_per_client(ties)[0]["eta"] == 0.05  # the smaller eta on ties
