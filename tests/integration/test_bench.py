"""`atlas bench`'s measuring on a tiny model: both loops run the same round and the table has their rows."""
from __future__ import annotations

from atlasfl.bench import bench_rows


def test_bench_rows_time_the_plain_loop_and_atlas_on_the_same_clients():
    settings = dict(tasks=("gen_sentiment", "gen_pair"), clients_per_task=2, max_samples=24, max_test_samples=16,
                    batch_size=8, fingerprint_samples=8, local_epochs=1, rounds=1, group_by_length=True,
                    data_dir=None, device="cpu")
    rows = bench_rows("tiny-bert", settings)
    assert [r[2] for r in rows] == ["plain loop", "atlas, ungrouped", "atlas, ungrouped + client batching",
                                    "atlas, grouped", "atlas, grouped + client batching"]
    assert all(r[0] == "tiny-bert" and r[1] == "4" for r in rows)
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows)  # the ratio's formula: tests/unit/test_bench.py
    padding = {r[2]: float(r[-2]) for r in rows}
    assert padding["atlas, grouped"] <= padding["atlas, ungrouped"]  # length-grouped batches never pad more here
    # a pass pads to its widest client's batch
    assert padding["atlas, ungrouped + client batching"] >= padding["atlas, ungrouped"]


def test_method_rows_run_each_method_on_the_same_clients_with_its_own_bytes():
    from atlasfl.bench import method_rows

    settings = dict(tasks=("gen_sentiment", "gen_pair"), clients_per_task=2, max_samples=24, max_test_samples=16,
                    batch_size=8, fingerprint_samples=8, local_epochs=1, rounds=1, data_dir=None, device="cpu")
    rows = method_rows("tiny-bert", settings, ["standard_fl", "local_only", "ffa_lora"])
    by_method = {r[1]: r for r in rows}
    assert list(by_method) == ["standard_fl", "local_only", "ffa_lora"] and all(r[2] == "4" for r in rows)
    assert by_method["standard_fl"][-1] == "1.00x"  # the first method is the unit
    up = {m: int(r[7].replace(",", "")) for m, r in by_method.items()}
    assert up["local_only"] == 0 < up["ffa_lora"] < up["standard_fl"]  # nothing, B and the head, everything
