"""The Flower engine on Flower's Simulation Runtime: same result schema, same states and metrics as the
in-process engine, and message sizes that agree with our accounting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlasfl.engines.flower.records import content_sizes, record_to_state, state_to_record
from atlasfl.experiment import run_and_save
from atlasfl.federation.wire import wire
from atlasfl.results.schema import validate_result
from tests.conftest import force_clusters


def _digests(result, r):
    return result["round_metrics"][r]["state_digests"]


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_states_travel_at_the_wire_dtype_and_sizes_match_our_accounting(wire_dtype):
    from flwr.app import RecordDict

    state = {"lora::m::A": torch.randn(4, 16), "lora::m::B": torch.randn(16, 4), "head::weight": torch.randn(2, 16)}
    record, nbytes = state_to_record(state, wire_dtype)
    itemsize = 4 if wire_dtype == "float32" else 2
    assert nbytes == itemsize * sum(v.numel() for v in state.values())
    back = record_to_state(record, wire_dtype)
    expected, expected_bytes = wire(state, wire_dtype)  # the in-process engine's trip
    assert expected_bytes == nbytes
    for key in state:
        assert back[key].dtype == torch.float32 and torch.equal(back[key], expected[key])
    sizes = content_sizes(RecordDict({"state": record}))
    assert sizes["payload"] == nbytes
    assert nbytes < sizes["arrays"] <= sizes["message"]  # Flower adds NumPy headers and array names


def test_flower_simulation_matches_the_inprocess_engine(make_config, tmp_path, monkeypatch):
    """Same config and seed: identical clusters, ranks, per-round state digests and metrics.

    Both engines train with one intra-op thread here (conftest; Ray gives each 1-CPU actor one), so
    the states are bit-identical. With different thread counts float32 sums are ordered differently
    and the weights differ at rounding level, which can flip single predictions (see README).
    Clusters are forced to {0, 1}, {2}, {3}: the engines must agree that clients alone in their cluster,
    and every client at η = 0, send nothing (at float16, where a round trip would change the state)."""
    force_clusters(monkeypatch, [0, 0, 1, 2])
    kw = dict(model="tiny-bert", method="atlas", lambda_sweep=True, lambda_grid=(0.0, 0.5), rounds=2,
              wire_dtype="float16", dirichlet_alpha=0.5)
    inproc, _ = run_and_save(make_config(**kw, output_dir=str(tmp_path / "a")), progress=False)
    flower, path = run_and_save(make_config(**kw, output_dir=str(tmp_path / "b"), engine="flower"), progress=False)
    on_disk = json.loads(path.read_text())
    validate_result(on_disk)
    assert on_disk["config"]["engine"] == "flower" and on_disk["environment"]["engine"] == "flower"
    assert flower["cluster_labels"] == inproc["cluster_labels"]
    assert flower["ranks"] == inproc["ranks"]
    assert flower["phase1_clustering"]["ari"] == inproc["phase1_clustering"]["ari"]
    assert flower["lambda_sweep"] == inproc["lambda_sweep"]  # every eta restarts from the same initial state
    for r in range(2):
        assert _digests(flower, r) == _digests(inproc, r)
    for task, m in inproc["final_metrics"]["per_task"].items():
        assert flower["final_metrics"]["per_task"][task]["score"] == pytest.approx(m["score"], abs=1e-9)
    assert flower["final_metrics"]["task_mean"] == pytest.approx(inproc["final_metrics"]["task_mean"], abs=1e-9)
    # the personal protocol and its references: each node derives its personal rows from its id alone
    assert flower["references"] == inproc["references"]
    for task, m in inproc["final_metrics"]["personal_per_task"].items():
        assert flower["final_metrics"]["personal_per_task"][task]["score"] == pytest.approx(m["score"], abs=1e-9)
    assert all(c["personal_n"] > 0 for c in flower["round_metrics"][-1]["clients"])
    ours, theirs = inproc["communication_costs"], flower["communication_costs"]
    for key in ("total_bytes_up", "total_bytes_down", "fingerprint_bytes_up", "per_client_bytes_up",
                "per_client_bytes_down"):
        assert theirs[key] == ours[key]
    for result in (inproc, flower):
        assert result["cluster_labels"] == [0, 0, 1, 2]
        for entry in result["round_metrics"]:
            sent = [(c["bytes_up"], c["bytes_down"]) for c in entry["clients"]]
            assert sent[2:] == [(0, 0), (0, 0)]
            assert all(b > 0 for b in sent[0] + sent[1]) == (result["lambda_sweep"]["selected_eta"] > 0)
    transport = theirs["transport"]
    # Over every message of every eta, clients 2 and 3 carried their fingerprint and no state at all.
    fingerprint_each = transport["phases"]["fingerprint"]["up_payload"] // 4
    for cid in ("2", "3"):
        assert transport["per_client"][cid]["up_payload"] == fingerprint_each
        assert transport["per_client"][cid]["down_payload"] == 0
    first = transport["per_client"]["0"]  # its messages of both etas: η = 0.5 carried states
    assert fingerprint_each < first["up_payload"] < first["up_arrays"] < first["up_message"]
    assert transport["rounds_payload_matches_accounting"] is True
    rounds = transport["phases"]["rounds"]
    assert rounds["up_payload"] == ours["total_bytes_up"] - ours["fingerprint_bytes_up"]
    assert rounds["down_payload"] == ours["total_bytes_down"]
    if flower["lambda_sweep"]["selected_eta"] > 0:
        assert 0 < rounds["up_payload"] < rounds["up_arrays"] < rounds["up_message"]
    else:  # at η = 0 the train replies carry control values and metrics, no arrays
        assert rounds["up_payload"] == rounds["up_arrays"] == 0 < rounds["up_message"]
    per_round = np.array(flower["time_metrics"]["per_round_s"])
    assert len(per_round) == 2 and np.all(per_round > 0)


def test_pyproject_declares_the_flower_app_and_its_run_config_builds_a_run():
    import tomllib
    from pathlib import Path

    from flwr.cli.config_utils import load_and_validate

    from atlasfl.engines.flower import client_app, resident, server_app
    from atlasfl.engines.flower.server_app import config_from_run_config, run_config_defaults

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    config, _ = load_and_validate(pyproject)
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "atlasfl.engines.flower.server_app:app",
                                 "clientapp": "atlasfl.engines.flower.resident:app"}
    assert server_app.app is not None
    # The deployed app relays every message type the ATLAS ClientApp answers.
    assert set(resident.app._registered_funcs) == set(client_app.app._registered_funcs)
    table = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    # The table mirrors RunConfig: one key per setting, of the setting's type.
    derived = run_config_defaults()
    assert list(table) == list(derived)
    assert {k: type(v) for k, v in table.items()} == {k: type(v) for k, v in derived.items()}
    cfg = config_from_run_config(table)
    assert cfg.engine == "flower" and cfg.model == "tiny-bert" and cfg.mode == "quick"
    cfg = config_from_run_config(dict(table, model="gpt2", seed=42, mode="full", tasks="glue", rounds=10, eta=0.2,
                                      **{"output-dir": "out", "clients-per-task": 3, "devices": "cpu_2gb gpu_16gb"}))
    assert (cfg.run_name, cfg.eta, cfg.tasks, cfg.output_dir) == (
        "atlas_gpt2_atlas_seed42_r10_eta0.2", 0.2, ("glue",), "out")
    assert cfg.devices == ("cpu_2gb", "gpu_16gb") and cfg.batch_size == 16  # 0 in the table: gpt2's preset
    assert config_from_run_config(dict(table, eta=0.0)).eta == 0.0  # a real 0 where 0 is a real value


def test_run_config_empty_values_mean_unset_only_where_no_real_value_is_empty():
    from atlasfl.config import RunConfig, build_config
    from atlasfl.engines.flower.server_app import run_config_defaults
    from atlasfl.errors import AtlasError

    for key, value in run_config_defaults().items():
        name = key.replace("-", "_")
        # seeds are real at 0; tune_seed means something only with tune, which the Flower engine refuses
        if value in (0, "") and not isinstance(value, bool) and name not in ("seed", "tune_seed"):
            field = RunConfig.model_fields[name]
            empty = () if "tuple" in str(field.annotation) else value
            with pytest.raises(AtlasError):
                build_config("tiny-bert", 0, "atlas", **{name: empty})


def test_unknown_run_config_key_is_one_clear_error():
    from atlasfl.engines.flower.server_app import config_from_run_config, run_config_defaults
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="unknown run-config key 'overrides'"):
        config_from_run_config(dict(run_config_defaults(), overrides='{"eta": 0.2}'))


def test_cli_engine_option(capsys, tmp_path, monkeypatch):
    from atlasfl.cli.app import main

    monkeypatch.chdir(tmp_path)  # logs/ of the refused run

    code = main(["run", "tiny-bert", "0", "atlas", "--engine", "grpc", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--engine" in err and len(err.splitlines()) == 1
