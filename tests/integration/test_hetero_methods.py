"""End to end on a tiny model: the heterogeneous-rank field methods (`flexlora`, `hetlora`) send exactly their
adapters at each client's ranks and its head, and `flexlora --sharing cluster` is `atlas_no_laplacian`."""
from __future__ import annotations

import pytest

from tests.conftest import HETERO_DEVICES, outcome, saved_result, state_floats

HETERO = ("flexlora", "hetlora")


def _run(make_config, method, **kw):
    return saved_result(make_config(method=method, devices=HETERO_DEVICES, **kw))


@pytest.mark.parametrize("method", HETERO)
def test_each_client_sends_its_own_ranks_adapters_and_head_each_way_each_round(make_config, method):
    result = _run(make_config, method)
    comm = result["communication_costs"]
    rounds = result["round_metrics"]
    ranks = {int(c): r for c, r in result["ranks"].items()}
    assert len({tuple(sorted(r.items())) for r in ranks.values()}) > 1  # the device profiles give unequal ranks
    # Both tasks are binary: every head is 2×32 with bias. Fingerprints: sketch (64); σ², n, dims (3); a sketched
    # mean and a count per label (2·65); one importance per adapted module (4): the ranks follow them.
    fingerprint = 4 * (64 + 3 + 2 * 65 + 4)
    assert comm["fingerprint_bytes_up"] == fingerprint * len(ranks)
    for cid, r in ranks.items():
        per_round = 4 * state_floats("tiny-bert", r, num_labels=2)  # float32: r_m·(d_in + d_out) per module + head
        for entry in rounds:
            client = next(c for c in entry["clients"] if c["client_id"] == cid)
            assert client["bytes_up"] == client["bytes_down"] == per_round
        assert comm["per_client_bytes_up"][str(cid)] == len(rounds) * per_round + fingerprint
        assert comm["per_client_bytes_down"][str(cid)] == len(rounds) * per_round


def test_flexlora_in_clusters_is_atlas_no_laplacian(make_config, tmp_path):
    ours = _run(make_config, "flexlora", sharing="cluster")
    theirs = _run(make_config, "atlas_no_laplacian", output_dir=str(tmp_path / "theirs"))
    assert ours["cluster_labels"] == theirs["cluster_labels"] and ours["ranks"] == theirs["ranks"]
    assert len(set(ours["cluster_labels"])) > 1  # the clusters split the clients, so sharing="all" would differ
    assert outcome(ours) == outcome(theirs)
    everyone = _run(make_config, "flexlora", output_dir=str(tmp_path / "all"))
    assert outcome(everyone)[0][-1] != outcome(ours)[0][-1]


def test_hetlora_regulariser_changes_local_training(make_config, tmp_path):
    plain = _run(make_config, "hetlora", hetlora_lambda=0.0)
    regularised = _run(make_config, "hetlora", hetlora_lambda=0.5, output_dir=str(tmp_path / "reg"))
    assert plain["ranks"] == regularised["ranks"]
    first = [r["clients"] for r in (plain["round_metrics"][0], regularised["round_metrics"][0])]
    # Round 1 starts alike (B = 0: the tail term and its gradient are 0), so the term acts from step 2 on.
    assert [c["train_loss"] for c in first[0]] != [c["train_loss"] for c in first[1]]
    assert outcome(plain)[0] != outcome(regularised)[0]


@pytest.mark.parametrize(("method", "kw"), [("flexlora", {}), ("hetlora", {"hetlora_lambda": 0.05}), ("flora", {})])
def test_flower_simulation_matches_the_inprocess_engine(make_config, tmp_path, method, kw):
    """Same states and metrics bit for bit at one thread (conftest; one Ray CPU per actor). hetlora runs at a
    non-default lambda, so the ClientApp must take the method's own setting from the run config; flora's clients
    merge what they receive into their residuals, as the ServerApp's copies do (it checks their digests)."""
    inproc = _run(make_config, method, output_dir=str(tmp_path / "a"), **kw)
    flower = _run(make_config, method, output_dir=str(tmp_path / "b"), engine="flower", **kw)
    assert flower["config"]["engine"] == "flower" and flower["ranks"] == inproc["ranks"]
    assert outcome(flower) == outcome(inproc)
    assert [[c["train_loss"] for c in r["clients"]] for r in flower["round_metrics"]] == \
        [[c["train_loss"] for c in r["clients"]] for r in inproc["round_metrics"]]
    for key in ("per_client_bytes_up", "per_client_bytes_down"):
        assert flower["communication_costs"][key] == inproc["communication_costs"][key]
