"""Flower runs that survive (Simulation Runtime): a client whose ClientApp fails is left out of its round
without poisoning its group's aggregate and rejoins the next; too few replies stop the run with its
checkpoint kept, and `--resume` then ends where the uninterrupted run ends. Failures are injected by a ClientApp
mod of the test's own (`failing`), in a ClientApp built like the real one."""
from __future__ import annotations

import json

import pytest
from flwr.app import MessageType

from atlasfl.engines.flower import client_app
from atlasfl.errors import AtlasError
from atlasfl.experiment import run_and_save
from atlasfl.results.checkpoint import complete_checkpoints
from atlasfl.results.schema import validate_result
from tests.conftest import force_clusters

GROUPS = [0, 0, 1, 1]  # two groups of two: a lost member leaves one partner behind
PHASES = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}


def failing(spec: str):
    """A ClientApp mod that raises in `phase` of round `r` for client `c`, for every "phase:c:r" of the
    comma-separated `spec`, as a crashing ClientApp would."""
    def mod(msg, context, call_next):
        phase = PHASES.get(msg.metadata.message_type)
        if phase is not None:
            round_idx = int(msg.content["atlas"]["round"])
            if f"{phase}:{context.node_config['partition-id']}:{round_idx}" in spec.split(","):
                raise RuntimeError(f"injected failure in {phase} of round {round_idx}")
        return call_next(msg, context)
    return mod


@pytest.fixture
def inject(monkeypatch):
    """Run the Flower engine with `failing(spec)` in its ClientApp."""
    return lambda spec: monkeypatch.setattr(client_app, "app", client_app.make_client_app(failing(spec)))


def _outcome(result: dict) -> list:
    """What a run computed, round by round: every client's state digest and test metrics."""
    return [(r["state_digests"], [(c["client_id"], c["train_loss"], c["test_metric"], c["test_loss"])
                                  for c in r["clients"]]) for r in result["round_metrics"]]


def test_a_failing_client_is_left_out_of_its_round_and_rejoins(make_config, monkeypatch, inject, tmp_path):
    force_clusters(monkeypatch, GROUPS)
    inject("train:1:2,evaluate:2:2")  # client 1 in training, 2 in evaluation
    result, path = run_and_save(make_config(method="fedavg_cluster", rounds=3, engine="flower"), progress=False)
    validate_result(json.loads(path.read_text()))
    first, second, third = result["round_metrics"]
    assert first["missing_clients"] == [] and third["missing_clients"] == []
    assert second["missing_clients"] == [1, 2]
    assert "injected failure in train of round 2" in second["missing_reasons"]["1"]
    assert "injected failure in evaluate of round 2" in second["missing_reasons"]["2"]
    d1, d2, d3 = first["state_digests"], second["state_digests"], third["state_digests"]
    # Client 1 missed training: it keeps its round-1 state, and its partner's aggregate is its partner's alone.
    assert d2["1"] == d1["1"] and d2["0"] not in (d1["0"], d2["1"])
    # Client 2 trained and was aggregated, then failed to evaluate: it holds the aggregate the server sent.
    assert d2["2"] == d2["3"] != d1["2"]
    clients = {c["client_id"]: c for c in second["clients"]}
    for cid in (1, 2):
        kept = {c["client_id"]: c for c in first["clients"]}[cid]
        assert clients[cid]["missing"] is True and clients[cid]["metrics_from_round"] == 1
        assert clients[cid]["test_metric"] == kept["test_metric"] and clients[cid]["train_loss"] == kept["train_loss"]
    assert (clients[1]["bytes_up"], clients[1]["bytes_down"]) == (0, 0)  # nothing sent to or by a client that failed
    assert clients[2]["bytes_up"] > 0 and clients[2]["bytes_down"] > 0  # its upload and the aggregate were sent
    assert "missing" not in {c["client_id"]: c for c in third["clients"]}[1]
    assert d3["0"] == d3["1"] and d3["2"] == d3["3"]  # both rejoined their groups
    transport = result["communication_costs"]["transport"]
    assert transport["rounds_payload_matches_accounting"] is None  # client 2 failed before measuring its message
    assert transport["phases"]["rounds"]["down_survival_payload"] > 0  # the restores of round 3
    log = (tmp_path / "logs" / f"{result['run_name']}.log").read_text()
    assert "client 1 is missing from round 2" in log


def test_too_few_replies_stop_with_the_checkpoint_kept_and_resume_ends_as_uninterrupted(make_config, monkeypatch,
                                                                                         inject, tmp_path):
    force_clusters(monkeypatch, GROUPS)
    kw = dict(method="atlas", eta=0.5, rounds=3, min_replies_per_group=2)
    reference, _ = run_and_save(make_config(**kw, output_dir=str(tmp_path / "reference")), progress=False)
    cfg = make_config(**kw, engine="flower")
    inject("train:3:2")
    with pytest.raises(AtlasError, match=r"group \[2, 3\] had 1 replying client.*min-replies-per-group 2.*resume"):
        run_and_save(cfg, progress=False)
    assert not cfg.result_path.exists()
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_path)][-1] == "round-00-0001"
    inject("")
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    validate_result(resumed)
    assert [r["missing_clients"] for r in resumed["round_metrics"]] == [[], [], []]
    assert _outcome(resumed) == _outcome(reference)  # the in-process engine's, bit for bit (one thread each)
    assert resumed["final_metrics"] == reference["final_metrics"]
