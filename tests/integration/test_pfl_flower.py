"""fedrep and ditto: Flower simulation gives the in-process engine's states (ditto's personal copies included),
metrics, training losses and bytes, bit for bit at one thread."""
from __future__ import annotations

import pytest

from atlasfl.experiment import run_and_save


def _run(make_config, **kw):
    result, _ = run_and_save(make_config(**kw), progress=False)
    return result


@pytest.mark.parametrize(("method", "kw"), [("fedrep", {"fedrep_head_epochs": 2}), ("ditto", {"ditto_lambda": 0.5})])
def test_flower_simulation_matches_the_inprocess_engine(make_config, tmp_path, method, kw):
    """Each at a non-default setting, so the ClientApp must take the method's own settings from the run config."""
    inproc = _run(make_config, method=method, output_dir=str(tmp_path / "a"), **kw)
    flower = _run(make_config, method=method, output_dir=str(tmp_path / "b"), engine="flower", **kw)
    assert flower["config"]["engine"] == "flower"
    assert [r["state_digests"] for r in flower["round_metrics"]] == \
        [r["state_digests"] for r in inproc["round_metrics"]]
    assert flower["final_metrics"] == inproc["final_metrics"]
    assert [[c["train_loss"] for c in r["clients"]] for r in flower["round_metrics"]] == \
        [[c["train_loss"] for c in r["clients"]] for r in inproc["round_metrics"]]
    for key in ("per_client_bytes_up", "per_client_bytes_down"):
        assert flower["communication_costs"][key] == inproc["communication_costs"][key]
