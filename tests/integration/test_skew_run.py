"""A federation on pathological and quantity-skewed shards runs end to end, and its personal protocol scores
each client on test rows of its own labels only."""
from __future__ import annotations

from atlasfl.data.tasks import load_task
from atlasfl.engines.inprocess import run_experiment
from atlasfl.federation.records import load_client_data
from atlasfl.results.schema import validate_result
from tests.conftest import tiny_config


def test_a_run_on_skewed_shards_scores_each_client_on_its_labels(tmp_path):
    cfg = tiny_config(tmp_path, tasks=("gen_topic", "gen_count"), clients_per_task=3, rounds=1, max_samples=30,
                      labels_per_client=1, quantity_skew=1.0, max_test_samples=None)
    result = run_experiment(cfg, progress=False)
    validate_result(result)
    clients = result["round_metrics"][-1]["clients"]
    test = {t: [ex.label for ex in load_task(t).test] for t in cfg.tasks}
    for c in clients:
        shard, _ = load_client_data(cfg, c["client_id"])
        (own,) = {ex.label for ex in shard.train + shard.val}
        assert c["personal_n"] == sum(label == own for label in test[c["task"]])  # every test row of its label
    sizes = [c["num_train"] + c["num_val"] for c in result["clients"]]
    assert sorted(sizes[:3]) == sorted(sizes[3:]) == [10, 15, 30]  # --max-samples 30 x 1, 1/2, 1/3
