"""Client sampling end to end (docs/scale.md): a cohort of every client is today's run, bit for bit; the clients
left out keep their states; every method runs with partial cohorts; a resumed run draws the same cohorts; and the
Flower engine agrees with the in-process one on the cohorts and the result."""
from __future__ import annotations

import json

import pytest
import torch

import atlasfl.results.checkpoint as ckpt
from atlasfl.experiment import run_and_save
from atlasfl.federation.cohort import cohort
from atlasfl.federation.transport import CHOICE_BYTES
from tests.conftest import comparable, outcome, saved_result

CLIENTS = list(range(4))  # conftest's tiny config: two tasks x two clients


def _rounds(result: dict) -> list[dict]:
    return comparable(result)["round_metrics"]


def test_a_cohort_of_every_client_is_the_run_without_sampling(make_config, tmp_path):
    kw = dict(method="atlas", rounds=2)
    plain = saved_result(make_config(**kw, output_dir=str(tmp_path / "a")))
    everyone = saved_result(make_config(**kw, output_dir=str(tmp_path / "b"), clients_per_round=len(CLIENTS)))
    assert outcome(everyone) == outcome(plain)
    assert _rounds(everyone) == _rounds(plain)  # metrics, bytes, participants and the simulated clock
    assert all(r["participants"] == CLIENTS for r in plain["round_metrics"])
    assert all(c["participation"] == "trained" and c["simulated_s"] > 0
               for r in plain["round_metrics"] for c in r["clients"])


@pytest.mark.parametrize("method", ["atlas", "fedavg_cluster", "ifca", "cfl", "ditto", "flora"])
def test_clients_left_out_keep_their_state_and_send_nothing(make_config, method):
    """...until they are next asked to train or be tested: then a method that shares a group model sends them what
    they missed first (`caught_up`), and only then."""
    cfg = make_config(method=method, rounds=3, clients_per_round=2, seed=2)
    result = saved_result(cfg)
    previous: dict[str, str] = {}
    caught = set()
    for entry in result["round_metrics"]:
        r = entry["round"]
        assert entry["participants"] == cohort(r, cfg.seed, CLIENTS, 2)  # seeded: the same draw every time
        caught |= set(entry.get("caught_up", []))
        for c in entry["clients"]:
            cid = c["client_id"]
            if cid in entry["participants"]:
                assert c["participation"] == "trained" and c["train_loss"] is not None
                continue
            assert c["participation"] == "not_sampled" and c["simulated_s"] is None
            if cid in entry.get("caught_up", []):
                assert c["bytes_down"] > 0  # its group's latest model (ifca: the k models), before its test
                assert c["bytes_up"] == (CHOICE_BYTES if method == "ifca" else 0)
                continue
            assert c["bytes_up"] == c["bytes_down"] == 0
            if str(cid) in previous:
                assert entry["state_digests"][str(cid)] == previous[str(cid)]  # its state did not change
            else:
                assert str(cid) not in entry["state_digests"]  # never trained: the initial state, held on the client
            tested = r == 1 or r == cfg.rounds  # every client is tested in the first and the last round
            assert (c.get("metrics_from_round") is None) == tested
        previous = entry["state_digests"]
    assert result["final_metrics"]["per_client"].keys() == {str(c) for c in CLIENTS}
    assert bool(caught) == (method != "atlas")  # atlas's step is personal; ifca offers its k models again


@pytest.mark.parametrize("method", ["fedavg_cluster", "standard_fl", "fedsa_lora"])
def test_a_sampled_client_trains_from_its_groups_latest_model(make_config, method):
    """FedAvg's protocol: the server sends its current model to each round's cohort. After the last round, in which
    every client is tested, every member of a sharing group holds the group's model (the parts the method shares),
    whichever rounds it took part in; without the catch-up, the members left out hold older models."""
    from atlasfl.engines.inprocess import InProcess
    from atlasfl.federation import driver
    from atlasfl.methods.base import select

    cfg = make_config(method=method, rounds=4, clients_per_round=2, seed=2)
    transport = InProcess(cfg)
    result = driver.run(cfg, transport)
    states = transport.states()
    groups = [list(CLIENTS)] if method != "fedavg_cluster" else [
        [c for c in CLIENTS if result["cluster_labels"][c] == label] for label in set(result["cluster_labels"])]
    shared = transport.method.downloads
    for group in groups:
        first = select(states[group[0]], shared)
        for c in group[1:]:
            same_shapes = {k: v for k, v in select(states[c], shared).items() if v.shape == first[k].shape}
            assert same_shapes and all(torch.equal(v, first[k]) for k, v in same_shapes.items()), (group, c)
    absent_then_sampled = [c for e, nxt in zip(result["round_metrics"], result["round_metrics"][1:])
                           for c in nxt["participants"] if c not in e["participants"] and c in nxt.get("caught_up", [])]
    assert absent_then_sampled, "the case should sample a client that missed the round before"


@pytest.mark.parametrize("method", ["atlas", "flora"])
def test_a_resumed_run_with_sampling_gives_the_uninterrupted_result(make_config, tmp_path, monkeypatch, method):
    """flora: the merges an absent client is owed travel in the checkpoint."""
    kw = dict(method=method, rounds=3, clients_per_round=2, dropout_rate=0.3, round_deadline=0.009)
    whole = saved_result(make_config(**kw, output_dir=str(tmp_path / "a"), checkpoint_dir=str(tmp_path / "ca")))
    real, writes = ckpt.save_file, []

    def dying(tensors, filename):
        writes.append(filename)
        if len(writes) == 3:  # round 2's checkpoint (round 0 is the plan) dies: round 1's is the last
            raise KeyboardInterrupt
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", dying)
    cfg = make_config(**kw, output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "cb"))
    with pytest.raises(KeyboardInterrupt):
        run_and_save(cfg, progress=False)
    writes.clear()
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert len(writes) == 2  # rounds 2 and 3 only: it continued from round 1's checkpoint
    assert _rounds(resumed) == _rounds(whole) and outcome(resumed) == outcome(whole)
    left = [why for r in whole["round_metrics"] for why in r["simulated"]["left_out"].values()]
    assert left, "the case should drop somebody (a dropout or a straggler past the simulated deadline)"


def test_flower_and_inprocess_agree_on_the_cohorts_and_the_result(make_config, tmp_path):
    """An eta sweep: every eta restarts each client from its initial state the first time it is sampled."""
    kw = dict(method="atlas", lambda_sweep=True, lambda_grid=(0.0, 0.5), rounds=3, clients_per_round=2, seed=2)
    inproc = saved_result(make_config(**kw, output_dir=str(tmp_path / "a")))
    flower = saved_result(make_config(**kw, output_dir=str(tmp_path / "b"), engine="flower"))
    assert outcome(flower) == outcome(inproc)
    for ours, theirs in zip(inproc["round_metrics"], flower["round_metrics"]):
        assert theirs["participants"] == ours["participants"] and theirs["simulated"] == ours["simulated"]
        assert [(c["bytes_up"], c["bytes_down"]) for c in theirs["clients"]] == [
            (c["bytes_up"], c["bytes_down"]) for c in ours["clients"]]
    assert json.dumps(flower["final_metrics"], sort_keys=True) == json.dumps(inproc["final_metrics"], sort_keys=True)


@pytest.mark.parametrize("method", ["fedsa_lora", "flora", "ifca"])
def test_flower_and_inprocess_agree_on_what_absent_clients_catch_up_on(make_config, tmp_path, method):
    """fedsa_lora catches up on A alone (a client that never trained starts from its node's initial B and head);
    flora on every merge it missed, in order; ifca is offered the k models again."""
    kw = dict(method=method, rounds=3, clients_per_round=2, seed=2)
    inproc = saved_result(make_config(**kw, output_dir=str(tmp_path / "a")))
    flower = saved_result(make_config(**kw, output_dir=str(tmp_path / "b"), engine="flower"))
    assert any(r.get("caught_up") for r in inproc["round_metrics"])
    assert outcome(flower) == outcome(inproc)
    for ours, theirs in zip(inproc["round_metrics"], flower["round_metrics"]):
        assert theirs.get("caught_up") == ours.get("caught_up") and theirs["state_digests"] == ours["state_digests"]
        assert [c["bytes_down"] for c in theirs["clients"]] == [c["bytes_down"] for c in ours["clients"]]
