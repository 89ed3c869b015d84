"""`--eval-every K`: tests in the first, every K-th and the last round; rounds between carry each client's
last test metrics, labelled; training, states and final scores are those of K = 1, and a tuner still
gets validation every round."""
from __future__ import annotations

import pytest

from atlasfl.engines.inprocess import run_experiment
from atlasfl.federation.records import is_test_round, log_round
from atlasfl.results.schema import validate_result
from tests.conftest import comparable, tiny_config

TEST_KEYS = ("test_loss", "test_accuracy", "test_metric", "personal_metric", "personal_n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three rounds of one tiny federation: by default, with --eval-every 1, and with --eval-every 3 under a
    tuner's per-round callback (which records what it was handed)."""
    tmp = tmp_path_factory.mktemp("eval_every")
    seen = []
    plain = run_experiment(tiny_config(tmp / "a", rounds=3), progress=False)
    one = run_experiment(tiny_config(tmp / "b", rounds=3, eval_every=1), progress=False)
    sparse = run_experiment(tiny_config(tmp / "c", rounds=3, eval_every=3), progress=False,
                            on_round=lambda r, val: seen.append((r, val)))
    return plain, one, sparse, seen


def test_eval_every_one_is_todays_run_bit_for_bit(runs):
    plain, one, _, _ = runs
    assert comparable(one) == comparable(plain)


def test_rounds_between_carry_the_last_test_labelled(runs):
    plain, _, sparse, _ = runs
    validate_result(sparse)
    rounds, today = sparse["round_metrics"], plain["round_metrics"]
    assert [r.get("evaluated") for r in rounds] == [None, False, None]
    assert [r["state_digests"] for r in rounds] == [r["state_digests"] for r in today]  # the same training
    for carried, first, now in zip(rounds[1]["clients"], rounds[0]["clients"], today[1]["clients"]):
        assert carried["metrics_from_round"] == 1 and not carried.get("missing")
        assert {k: carried[k] for k in TEST_KEYS} == {k: first[k] for k in TEST_KEYS}
        assert carried["train_loss"] == now["train_loss"]  # this round's training
        assert (carried["bytes_up"], carried["bytes_down"]) == (now["bytes_up"], now["bytes_down"])
    assert rounds[1]["mean_task_score"] == rounds[0]["mean_task_score"]
    assert rounds[2]["clients"] == today[2]["clients"] and sparse["final_metrics"] == plain["final_metrics"]
    work = [r["evaluate"]["examples"] for r in sparse["time_metrics"]["rounds"]]
    assert work[1] == 0 and work[0] == work[2] > 0  # no test pass in round 2


def test_a_tuner_still_gets_validation_every_round(runs):
    _, _, sparse, seen = runs
    clients = {c["client_id"] for c in sparse["clients"]}
    assert [r for r, _ in seen] == [1, 2, 3]
    assert all(set(val) == clients for _, val in seen)
    assert seen[1][1] != seen[0][1]  # round 2's own validation, not a carried one


def test_which_rounds_test(tmp_path):
    cfg = tiny_config(tmp_path, rounds=10, eval_every=4)
    assert [r for r in range(1, 11) if is_test_round(cfg, r)] == [1, 4, 8, 10]
    assert all(is_test_round(tiny_config(tmp_path, rounds=3), r) for r in (1, 2, 3))


def test_the_flower_engine_carries_the_same_rounds(runs, tmp_path):
    """Flower delivers the new states with the evaluate message, so a round without a test still sends it (no
    test pass on the node): the states and records are the in-process engine's."""
    from atlasfl.experiment import run_and_save

    _, _, sparse, _ = runs
    flower, _ = run_and_save(tiny_config(tmp_path, rounds=3, eval_every=3, engine="flower"), progress=False)
    validate_result(flower)
    assert [r.get("evaluated") for r in flower["round_metrics"]] == [None, False, None]
    digests = [r["state_digests"] for r in sparse["round_metrics"]]
    assert [r["state_digests"] for r in flower["round_metrics"]] == digests
    assert [c["metrics_from_round"] for c in flower["round_metrics"][1]["clients"]] == [1] * len(sparse["clients"])
    assert flower["final_metrics"]["task_mean"] == pytest.approx(sparse["final_metrics"]["task_mean"], abs=1e-9)


def test_the_log_says_when_a_rounds_score_is_carried(runs, caplog):
    _, _, sparse, _ = runs
    with caplog.at_level("INFO", logger="atlasfl"):
        for entry in sparse["round_metrics"]:
            log_round(0.0, entry)
    lines = [r.getMessage() for r in caplog.records if "mean task score" in r.getMessage()]
    assert ["carried" in line for line in lines] == [False, True, False]
