"""End to end on tiny models: every method writes a valid result whose state digests prove its sharing."""
from __future__ import annotations

import json

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.results.schema import validate_result
from tests.conftest import TINY_MODELS, state_floats


def _digests(result, round_idx):
    d = result["round_metrics"][round_idx]["state_digests"]
    return [d[str(c["client_id"])] for c in result["clients"]]


def _run(make_config, model, method, **kw):
    cfg = make_config(model=model, method=method, **kw)
    result, path = run_and_save(cfg, progress=False)
    on_disk = json.loads(path.read_text())
    validate_result(on_disk)
    assert on_disk["run_name"] == cfg.run_name and path.name == f"{cfg.run_name}.json"
    return on_disk


@pytest.mark.parametrize("model", TINY_MODELS)
def test_fedavg_cluster_shares_within_clusters_only(make_config, model):
    # The aggregation semantics under the true task groups (clusters="oracle"): with the tiny config's 8
    # fingerprint samples, phase 1 splits a task on tiny-bert and tiny-qwen2 (ARI 0.57), and a test
    # reading whatever labels came out would pass for any labels, even k=1. Whether fingerprints find the
    # tasks is tested in tests/unit/test_clustering.py and tests/integration/test_fingerprints.py.
    result = _run(make_config, model, "fedavg_cluster", clusters="oracle")
    labels = result["cluster_labels"]
    true_tasks = [c["task"] for c in result["clients"]]
    assert labels == [0, 0, 1, 1] and true_tasks == ["gen_sentiment"] * 2 + ["gen_pair"] * 2
    for r in range(len(result["round_metrics"])):
        digests = _digests(result, r)
        for i in range(len(digests)):
            for j in range(len(digests)):
                assert (digests[i] == digests[j]) == (true_tasks[i] == true_tasks[j])
    assert all(a != b for a, b in zip(_digests(result, 0), _digests(result, -1)))  # the cluster models keep learning


@pytest.mark.parametrize("model", TINY_MODELS)
def test_standard_fl_gives_every_client_the_same_state(make_config, model):
    result = _run(make_config, model, "standard_fl")
    for r in range(len(result["round_metrics"])):
        assert len(set(_digests(result, r))) == 1
    first, last = _digests(result, 0)[0], _digests(result, -1)[0]
    assert first != last  # the shared model keeps learning


@pytest.mark.parametrize("model", TINY_MODELS)
def test_local_only_clients_never_share_and_always_train(make_config, model):
    result = _run(make_config, model, "local_only")
    rounds = [_digests(result, r) for r in range(len(result["round_metrics"]))]
    for digests in rounds:
        assert len(set(digests)) == len(digests)
    for before, after in zip(rounds, rounds[1:]):
        assert all(b != a for b, a in zip(before, after))
    assert result["communication_costs"]["total_bytes_up"] == 0
    assert result["communication_costs"]["total_bytes_down"] == 0


def test_same_seed_same_json_times_aside(make_config, tmp_path):
    a = _run(make_config, "tiny-bert", "fedavg_cluster")
    b_cfg = make_config(model="tiny-bert", method="fedavg_cluster", output_dir=str(tmp_path / "again"))
    b, _ = run_and_save(b_cfg, progress=False)
    assert _strip_times(a) == _strip_times(json.loads(json.dumps(b)))
    c = _run(make_config, "tiny-bert", "fedavg_cluster", seed=1)
    assert _digests(a, -1) != _digests(c, -1)


def _strip_times(result):
    out = json.loads(json.dumps(result))
    for key in ("time_metrics", "memory", "environment"):
        out.pop(key)
    out["config"].pop("output_dir")
    for r in out["round_metrics"]:
        r.pop("time_s")
    return out


@pytest.mark.parametrize(("wire_dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_result_reports_glue_metrics_and_communication(make_config, wire_dtype, itemsize):
    result = _run(make_config, "tiny-bert", "fedavg_cluster", clusters="oracle", wire_dtype=wire_dtype)
    per_task = result["final_metrics"]["per_task"]
    assert set(per_task) == {"gen_sentiment", "gen_pair"}
    scores = [t["score"] for t in per_task.values()]
    assert result["final_metrics"]["task_mean"] == pytest.approx(sum(scores) / len(scores))
    comm = result["communication_costs"]
    assert comm["total_bytes_up"] == sum(r["bytes_up_total"] for r in result["round_metrics"]) + \
        comm["fingerprint_bytes_up"]
    # float32: sketch; σ², n, dims; a sketched mean and a count per label (both tasks have 2 labels)
    assert comm["fingerprint_bytes_up"] == 4 * (64 + 3 + 2 * 65) * len(result["clients"])
    # Bytes are exactly the adapters and heads a client holds at the wire dtype, never the frozen backbone:
    # itemsize × (Σ_m r_m·(d_in + d_out) + head parameters), per client, per direction, per round.
    for entry in result["round_metrics"]:
        for c in entry["clients"]:
            ranks = result["ranks"][str(c["client_id"])]
            assert set(ranks.values()) == {4}  # fedavg_cluster: the preset's median rank everywhere
            expected = itemsize * state_floats("tiny-bert", ranks, num_labels=2)
            assert c["bytes_up"] == c["bytes_down"] == expected
    # tiny-bert by hand: 4 adapted 32×32 projections at rank 4, a 2×32 head with bias
    assert expected == itemsize * (4 * 4 * (32 + 32) + 2 * 32 + 2)
