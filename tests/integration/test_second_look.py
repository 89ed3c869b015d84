"""The second look end to end on tiny-bert: both partitions, their ARI and the bytes it cost are recorded; round 1 asks
a lone client for its upload only when the look is on; the refined partition groups the clients from round 2 on,
also after a resume from round 1's checkpoint; `--second-look off` (and auto on an unambiguous phase 1) leave the
run as it was."""
from __future__ import annotations

import shutil

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.phases import second_look
from atlasfl.phases.clustering import adjusted_rand
from atlasfl.results.checkpoint import complete_checkpoints
from tests.conftest import comparable, force_clusters, saved_result

TRUTH = [0, 0, 0, 1, 1, 1]  # BINARY_TASKS at 3 clients per task


def _config(make_config, **kw):
    return make_config(method="fedavg_cluster", clients_per_task=3, **kw)


def test_on_records_both_partitions_their_ari_and_the_lone_clients_upload(make_config, monkeypatch, tmp_path):
    forced = [0, 0, 0, 0, 0, 1]  # client 5 alone: without the look it uploads nothing in round 1
    force_clusters(monkeypatch, forced)
    on = saved_result(_config(make_config, second_look="on"))
    look = on["second_look"]
    assert look["mode"] == "on" and look["skipped"] is None
    assert look["phase1_labels"] == forced and len(look["labels"]) == 6
    assert look["phase1_ari"] == pytest.approx(adjusted_rand(forced, TRUTH))
    assert look["ari"] == pytest.approx(adjusted_rand(look["labels"], TRUTH))
    assert look["extra_rounds"] == 0 and look["effective_from_round"] == 2
    first, second = on["round_metrics"]
    assert look["extra_uploaders"] == [5]
    assert look["extra_bytes_up"] == first["clients"][5]["bytes_up"] == first["clients"][0]["bytes_up"] > 0
    assert first["clients"][5]["bytes_down"] == 0  # it uploaded for the look only: phase 1's groups aggregate round 1
    sharing = {c for c in range(6) if look["labels"].count(look["labels"][c]) > 1}
    assert {c for c in range(6) if second["clients"][c]["bytes_up"] > 0} == sharing  # round 2: the refined groups
    off = saved_result(_config(make_config, second_look="off", output_dir=str(tmp_path / "off")))
    assert off["second_look"] is None and off["round_metrics"][0]["clients"][5]["bytes_up"] == 0


def _stub_refine(monkeypatch):
    """The rule's answer fixed to the true tasks: what the wiring does with a partition, whatever tiny-bert's noisy
    round-1 updates say (tests/unit/test_second_look.py tests the rule itself)."""
    rule = second_look.refine

    def refine(S, labels, **kw):
        return dict(rule(S, labels, **kw), labels=list(TRUTH))
    monkeypatch.setattr(second_look, "refine", refine)


def test_the_refined_partition_groups_from_round_2_and_a_resume_from_round_1_restores_it(make_config, monkeypatch,
                                                                                          tmp_path):
    force_clusters(monkeypatch, [0] * 6)
    _stub_refine(monkeypatch)
    kw = dict(second_look="on", rounds=3, keep_checkpoints=5, checkpoint_dir=str(tmp_path / "ck"))
    whole = saved_result(_config(make_config, output_dir=str(tmp_path / "a"), **kw))
    rounds = whole["round_metrics"]
    assert len({rounds[0]["state_digests"][str(c)] for c in range(6)}) == 1  # round 1: phase 1's one group
    for entry in rounds[1:]:  # from round 2: FedAvg inside each task
        digests = entry["state_digests"]
        assert len({digests[str(c)] for c in (0, 1, 2)}) == len({digests[str(c)] for c in (3, 4, 5)}) == 1
        assert digests["0"] != digests["3"]
    assert whole["second_look"]["labels"] == TRUTH and whole["second_look"]["ari"] == 1.0
    cfg = _config(make_config, output_dir=str(tmp_path / "b"), **kw)
    folders = complete_checkpoints(cfg.checkpoint_path)
    for folder in folders[-2:]:  # as if killed after round 1: the look is in the checkpoint's plan
        shutil.rmtree(folder)
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert comparable(resumed) == {**comparable(whole), "config": comparable(resumed)["config"]}


def test_off_and_auto_on_an_unambiguous_phase_1_are_the_run_without_a_look(make_config, tmp_path):
    auto = saved_result(_config(make_config, output_dir=str(tmp_path / "auto")))
    assert auto["phase1_clustering"]["ambiguous"] is False and auto["second_look"] is None
    off = saved_result(_config(make_config, second_look="off", output_dir=str(tmp_path / "off")))
    assert comparable(off) == {**comparable(auto), "config": comparable(off)["config"]}


def test_on_is_refused_where_no_phase_1_clusters_are_shared_in(make_config):
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="--second-look on"):
        make_config(method="local_only", second_look="on")
    with pytest.raises(AtlasError, match="--second-look on"):
        make_config(method="fedavg_cluster", clusters="oracle", second_look="on")


def test_a_sweeps_later_eta_takes_the_first_etas_look_without_asking_the_lone_client_again(make_config, monkeypatch):
    force_clusters(monkeypatch, [0, 0, 0, 0, 0, 1])
    _stub_refine(monkeypatch)
    result = saved_result(make_config(method="atlas", clients_per_task=3, second_look="on", lambda_sweep=True,
                                      lambda_grid=(0.1, 0.2)))
    look = result["second_look"]
    per_eta = result["communication_costs"]["per_eta"]
    # Round 1 of eta 0.1 carries client 5's upload for the look; eta 0.2's round 1 is phase 1's groups' alone.
    assert per_eta[0]["bytes_up"] - per_eta[1]["bytes_up"] == look["extra_bytes_up"] > 0
    assert look["labels"] == TRUTH


def test_flower_simulation_with_the_look_matches_the_inprocess_engine(make_config, monkeypatch, tmp_path):
    force_clusters(monkeypatch, [0, 0, 0, 0, 0, 1])
    _stub_refine(monkeypatch)
    kw = dict(second_look="on", rounds=3)
    inproc = saved_result(_config(make_config, output_dir=str(tmp_path / "a"), **kw))
    flower = saved_result(_config(make_config, output_dir=str(tmp_path / "b"), engine="flower", **kw))
    digests = [[r["state_digests"] for r in result["round_metrics"]] for result in (flower, inproc)]
    assert digests[0] == digests[1]
    assert flower["second_look"]["extra_bytes_up"] == inproc["second_look"]["extra_bytes_up"] > 0
    assert flower["communication_costs"]["transport"]["rounds_payload_matches_accounting"]
