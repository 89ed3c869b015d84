"""fedprox, ffa_lora and fedsa_lora on Flower's Simulation Runtime give what the in-process engine gives: the same
states every round, the same scores and bytes. Where a method sends back only part of a state (ffa_lora's B and
head, fedsa_lora's A), the server's copy of every client stays complete through the ClientApp's BACKUP of the rest:
the ServerApp checks each client's state digest against its copy at every evaluation and stops the run on a
mismatch."""
from __future__ import annotations

import pytest

from atlasfl.experiment import run_and_save


@pytest.mark.parametrize(("method", "kw"), [("fedprox", dict(prox_mu=0.5)), ("ffa_lora", {}), ("fedsa_lora", {})])
def test_flower_simulation_matches_the_inprocess_engine(make_config, tmp_path, method, kw):
    inproc, _ = run_and_save(make_config(method=method, output_dir=str(tmp_path / "a"), **kw), progress=False)
    flower, _ = run_and_save(make_config(method=method, output_dir=str(tmp_path / "b"), engine="flower", **kw),
                             progress=False)
    assert [r["state_digests"] for r in flower["round_metrics"]] == [r["state_digests"] for r in
                                                                      inproc["round_metrics"]]
    assert len(inproc["round_metrics"]) == 2
    assert flower["final_metrics"] == inproc["final_metrics"]
    ours, theirs = inproc["communication_costs"], flower["communication_costs"]
    for key in ("total_bytes_up", "total_bytes_down", "per_client_bytes_up", "per_client_bytes_down"):
        assert theirs[key] == ours[key]
    assert ours["total_bytes_up"] > 0
    assert theirs["transport"]["rounds_payload_matches_accounting"] is True
