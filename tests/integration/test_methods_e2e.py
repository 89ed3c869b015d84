"""End to end on tiny models: every method writes a valid result whose state digests prove its sharing."""
from __future__ import annotations

import json

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.results.schema import validate_result
from tests.conftest import TINY_MODELS


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
    result = _run(make_config, model, "fedavg_cluster")
    labels = result["cluster_labels"]
    for r in range(len(result["round_metrics"])):
        digests = _digests(result, r)
        for i in range(len(digests)):
            for j in range(len(digests)):
                assert (digests[i] == digests[j]) == (labels[i] == labels[j])
    assert result["communication_costs"]["total_bytes_up"] > 0


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


def test_result_reports_glue_metrics_and_communication(make_config):
    result = _run(make_config, "tiny-bert", "fedavg_cluster")
    per_task = result["final_metrics"]["per_task"]
    assert set(per_task) == {"gen_sentiment", "gen_pair"}
    scores = [t["score"] for t in per_task.values()]
    assert result["final_metrics"]["task_mean"] == pytest.approx(sum(scores) / len(scores))
    comm = result["communication_costs"]
    assert comm["total_bytes_up"] == sum(r["bytes_up_total"] for r in result["round_metrics"]) + \
        comm["fingerprint_bytes_up"]
    assert comm["fingerprint_bytes_up"] == 4 * (64 + 1) * len(result["clients"])  # sketch + noise, float32
    # Bytes are exactly the float32 adapters and heads a client holds, never the frozen backbone.
    per_round = result["round_metrics"][0]["clients"][0]["bytes_up"]
    ranks = result["ranks"]["0"]
    assert per_round < 1_000_000 and len(ranks) > 0
