"""`ifca` and `cfl` end to end on a tiny model: exact bytes per round, the clusters and their ARI recorded every
round, a resumed run equal to the uninterrupted one, and the Flower simulation equal to the in-process engine."""
from __future__ import annotations

import json
import shutil

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.report.load import from_atlas
from atlasfl.results.checkpoint import complete_checkpoints
from atlasfl.results.schema import validate_result
from tests.conftest import state_floats

SPLITTING = dict(cfl_eps1=1e6, cfl_eps2=0.0, cfl_warmup=1)  # cfl splits whenever a cluster has more than two members


def _run(make_config, method, **kw):
    result, path = run_and_save(make_config(method=method, **kw), progress=False)
    on_disk = json.loads(path.read_text())
    validate_result(on_disk)
    return on_disk


def _outcome(result):
    return ([r["state_digests"] for r in result["round_metrics"]], [r["clusters"] for r in result["round_metrics"]],
            result["final_metrics"], {k: result["communication_costs"][k]
                                      for k in ("per_client_bytes_up", "per_client_bytes_down")})


def test_ifca_sends_k_models_down_and_one_with_its_id_up_and_clients_hold_their_clusters_model(make_config):
    result = _run(make_config, "ifca", rounds=2)
    state = 4 * state_floats("tiny-bert", result["ranks"]["0"], num_labels=2)  # float32 adapter + head
    k = 2  # the default: the run's two tasks
    for entry in result["round_metrics"]:
        assert [(c["bytes_up"], c["bytes_down"]) for c in entry["clients"]] == [(state + 4, k * state)] * 4
        labels = entry["clusters"]["labels"]
        assert set(labels) <= {0, 1} and isinstance(entry["clusters"]["ari"], float)
        digests = entry["state_digests"]  # every client holds exactly the model of the cluster it chose
        for j in set(labels):
            assert len({digests[str(c)] for c in range(4) if labels[c] == j}) == 1
    assert result["communication_costs"]["fingerprint_bytes_up"] == 0  # phase 1 for the report only
    assert "ari" in result["phase1_clustering"]


def test_cfl_is_fedavg_in_one_cluster_then_splits_and_records_its_rule(make_config, tmp_path):
    plain = _run(make_config, "cfl", rounds=2, cfl_eps2=1e6)  # no client ever moves enough: never a split
    fedavg = _run(make_config, "standard_fl", rounds=2, output_dir=str(tmp_path / "fedavg"))
    assert [r["state_digests"] for r in plain["round_metrics"]] == [r["state_digests"] for r in fedavg["round_metrics"]]
    state = 4 * state_floats("tiny-bert", plain["ranks"]["0"], num_labels=2)
    assert all((c["bytes_up"], c["bytes_down"]) == (state, state) for r in plain["round_metrics"] for c in r["clients"])
    assert [r["clusters"]["labels"] for r in plain["round_metrics"]] == [[0, 0, 0, 0]] * 2
    split = _run(make_config, "cfl", rounds=3, output_dir=str(tmp_path / "split"), **SPLITTING)
    rounds = split["round_metrics"]
    assert rounds[0]["clusters"]["rule_saw"] == []  # round 1: no starting states to measure updates from
    assert rounds[1]["clusters"]["rule_saw"][0]["split"] and len(set(rounds[1]["clusters"]["labels"])) == 2
    for entry in rounds[1:]:  # FedAvg inside each cluster of two or more: its members hold one state
        labels = entry["clusters"]["labels"]
        for j in set(labels):
            members = [c for c in range(4) if labels[c] == j]
            if len(members) > 1:
                assert len({entry["state_digests"][str(c)] for c in members}) == 1
    (record,) = from_atlas(split, tmp_path / "split.json")  # what the report's discovery table reads
    assert record.clusters_from == "training"
    assert record.round_ari == [r["clusters"]["ari"] for r in rounds]
    assert record.round_bytes == [r["bytes_up_total"] + r["bytes_down_total"] for r in rounds]


# ifca, 3 clusters over two label spaces: each cluster holds a head per label space, two seeded from one pooled mean
@pytest.mark.parametrize(("method", "kw"), [
    ("ifca", dict(tasks=("gen_topic", "gen_pair"), max_test_samples=64, ifca_k=3)), ("cfl", SPLITTING)])
def test_resumed_run_equals_the_uninterrupted_one(make_config, tmp_path, method, kw):
    whole = _run(make_config, method, rounds=3, keep_checkpoints=5, output_dir=str(tmp_path / "a"),
                 checkpoint_dir=str(tmp_path / "ck"), **kw)
    cfg = make_config(method=method, rounds=3, keep_checkpoints=5, output_dir=str(tmp_path / "b"),
                      checkpoint_dir=str(tmp_path / "ck"), **kw)
    folders = complete_checkpoints(cfg.checkpoint_path)
    assert folders[-1].name.endswith("0003")
    shutil.rmtree(folders[-1])  # as if killed after round 2, with the method's clusters of round 2 saved
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert _outcome(resumed) == _outcome(whole)


@pytest.mark.parametrize(("method", "kw"), [("ifca", {}), ("cfl", SPLITTING)])
def test_flower_simulation_matches_the_inprocess_engine(make_config, tmp_path, method, kw):
    inproc = _run(make_config, method, output_dir=str(tmp_path / "a"), rounds=3, **kw)
    flower = _run(make_config, method, output_dir=str(tmp_path / "b"), engine="flower", rounds=3, **kw)
    assert flower["config"]["engine"] == "flower"
    assert _outcome(flower) == _outcome(inproc)
    assert flower["communication_costs"]["transport"]["rounds_payload_matches_accounting"]
