"""End to end on tiny models: the atlas methods do what they claim to the weights."""
from __future__ import annotations

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.results.schema import validate_result
from tests.conftest import TINY_MODELS


def _digests(result, r=-1):
    d = result["round_metrics"][r]["state_digests"]
    return [d[str(c["client_id"])] for c in result["clients"]]


def _run(make_config, **kw):
    result, _ = run_and_save(make_config(**kw), progress=False)
    validate_result(result)
    return result


@pytest.mark.parametrize("model", TINY_MODELS)
def test_atlas_eta_zero_reproduces_local_only_and_eta_positive_differs(make_config, model, tmp_path):
    local = _run(make_config, model=model, method="local_only")
    eta0 = _run(make_config, model=model, method="atlas", eta=0.0)
    eta_pos = _run(make_config, model=model, method="atlas", eta=0.5)
    assert local["ranks"] == eta0["ranks"] == eta_pos["ranks"]
    for r in range(len(local["round_metrics"])):
        assert _digests(local, r) == _digests(eta0, r)
    assert local["final_metrics"] == eta0["final_metrics"]
    assert _digests(eta_pos, 0) != _digests(local, 0)
    # personalised: clients of one cluster hold different states, unlike the cluster mean
    assert len(set(_digests(eta_pos))) == len(eta_pos["clients"])


def test_atlas_no_laplacian_shares_the_cluster_mean_at_equal_ranks(make_config):
    # One device profile for all: equal rank maps inside a cluster, so the cluster mean is shared exactly.
    result = _run(make_config, model="tiny-gpt2", method="atlas_no_laplacian", devices=("gpu_16gb",),
                  fingerprint_samples=64, max_samples=80)
    labels, ranks = result["cluster_labels"], result["ranks"]
    for r in range(len(result["round_metrics"])):
        digests = _digests(result, r)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if ranks[str(i)] == ranks[str(j)]:
                    assert (digests[i] == digests[j]) == (labels[i] == labels[j])
    assert result["cluster_source"] == "fingerprint"
    assert result["phase1_clustering"]["ari"] == 1.0


def test_heterogeneous_ranks_are_applied_and_reported(make_config):
    result = _run(make_config, model="tiny-bert", method="atlas", devices=("cpu_2gb", "gpu_16gb"), clients_per_task=3)
    alloc = result["phase2_rank_allocation"]["clients"]
    assert {c["device"] for c in alloc.values()} == {"cpu_2gb", "gpu_16gb"}
    by_device = {}
    for cid, info in alloc.items():
        assert info["ranks"] == result["ranks"][cid]
        assert info["feasible"] is True
        by_device.setdefault(info["device"], set()).add(info["total_rank"])
    assert max(by_device["cpu_2gb"]) < min(by_device["gpu_16gb"])
    assert "ESTIMATE" in result["phase2_rank_allocation"]["memory_model"]
    assert "ESTIMATE" in result["memory"]["estimate"]["kind"]


def test_oracle_clusters_flag(make_config):
    result = _run(make_config, model="tiny-bert", method="fedavg_cluster", clusters="oracle")
    assert result["cluster_source"] == "oracle"
    assert result["cluster_labels"] == [0, 0, 1, 1]


def test_lambda_sweep_reports_every_eta_and_selects_by_validation(make_config):
    grid = (0.0, 0.5, 1.0)
    result = _run(make_config, model="tiny-bert", method="atlas", lambda_sweep=True, lambda_grid=grid, rounds=1)
    sweep = result["lambda_sweep"]
    assert sweep["grid"] == list(grid)
    assert len(sweep["val_scores"]) == len(sweep["test_scores"]) == 3
    best = max(range(3), key=lambda i: sweep["val_scores"][i])
    assert sweep["selected_eta"] == grid[best]
    assert result["round_metrics"][-1]["lambda_eta"] == grid[best]
    assert result["round_metrics"][-1]["mean_task_score"] == sweep["test_scores"][best]
    # The sweep trained and sent every eta's federation: its costs say so, beside the chosen eta's.
    comm, clock = result["communication_costs"], result["time_metrics"]
    assert [e["eta"] for e in comm["per_eta"]] == list(grid)
    assert comm["sweep_total_bytes_up"] == comm["fingerprint_bytes_up"] + sum(e["bytes_up"] for e in comm["per_eta"])
    assert comm["sweep_total_bytes_down"] == sum(e["bytes_down"] for e in comm["per_eta"]) > comm["total_bytes_down"]
    assert [(r["eta"], r["round"]) for r in clock["rounds"]] == [(eta, 1) for eta in grid]
    assert clock["totals"]["rounds"] == 3
    assert clock["totals"]["train"]["examples"] == 3 * sum(c["num_train"] for c in result["clients"])


def test_round_costs_count_the_work(make_config):
    result = _run(make_config, model="tiny-bert", method="fedavg_cluster")
    comm, rounds = result["communication_costs"], result["time_metrics"]["rounds"]
    assert comm.get("sweep_total_bytes_up") is None
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["train"]["examples"] == sum(c["num_train"] for c in result["clients"])
        assert 0 < r["train"]["real_tokens"] <= r["train"]["padded_tokens"]
        assert 0 < r["evaluate"]["examples"] and r["checkpoint_s"] > 0
