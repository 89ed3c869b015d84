"""Divergence is visible: the rule of federation.records.divergence, shared by both engines."""
from __future__ import annotations

import math

from atlasfl.federation.records import divergence, warn_diverged

LABELS = {"pos": 2, "three": 3}


def _rounds(*losses_per_round, tasks=("pos", "pos", "three")):
    return [dict(round=r, clients=[dict(client_id=c, task=tasks[c], train_loss=loss) for c, loss in enumerate(losses)])
            for r, losses in enumerate(losses_per_round, 1)]


def test_healthy_training_is_not_flagged():
    assert divergence(_rounds([0.69, 0.71, 1.1], [0.4, 0.72, 0.9], [0.2, 0.6, 0.5]), LABELS) == {}


def test_a_run_that_blows_up_in_its_first_round_is_caught():
    """--lr 1000: the first-round loss is already in the thousands, so a limit relative to it alone would miss it."""
    found = divergence(_rounds([5802.8, 0.7, 10.0], [17020.9, 0.69, 12.0]), LABELS)
    assert set(found) == {0, 2}  # client 2 has 3 labels: its limit is 10 x ln 3 = 10.99 < 12 (round 2)
    assert found[0]["round"] == 1 and math.isclose(found[0]["limit"], 10 * math.log(2))
    assert found[2]["round"] == 2 and math.isclose(found[2]["limit"], 10 * math.log(3))


def test_a_later_rise_far_above_the_first_round_and_non_finite_losses():
    found = divergence(_rounds([0.05, 0.3, 0.6], [0.6, float("nan"), 0.5], [0.4, 0.2, float("inf")]), LABELS)
    assert {c: f["round"] for c, f in found.items()} == {0: 2, 1: 2, 2: 3}
    assert math.isclose(found[0]["limit"], 0.5)  # 10 x its first-round loss, smaller than 10 x ln 2


def test_warning_names_the_client_once_in_the_round_it_diverged(capsys):
    rounds = _rounds([5802.8, 0.7, 0.6])
    warn_diverged(0.1, rounds, LABELS)
    rounds += _rounds([0.5, 0.7, 0.6], [9000.0, 0.7, 0.6])[1:]
    warn_diverged(0.1, rounds, LABELS)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "client 0 (pos) diverged in round 1" in lines[0] and "--lr" in lines[0]
