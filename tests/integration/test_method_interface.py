"""The driver honours what a method object says: the parts it trains and sends, and the extra term of its client
loss; and the in-process engine leaves a client whose training raises out of its round, as Flower does."""
from __future__ import annotations

import pytest
import torch

from atlasfl.engines import inprocess
from atlasfl.experiment import run_and_save
from atlasfl.federation import driver
from atlasfl.federation.training import TrainJob, client_seed, train_clients, train_local
from atlasfl.methods import METHODS
from atlasfl.methods.base import select
from atlasfl.methods.fedavg_cluster import FedAvgCluster
from tests.conftest import force_clusters

GROUPS = [0, 0, 1, 1]


class HeadsOnly(FedAvgCluster):
    """A scratch method: only the heads train and travel; the adapters stay as every client built them."""

    trains = uploads = downloads = ("head",)


@pytest.fixture
def transport_of(monkeypatch):
    """The in-process transport of the next run (its model holds every client's state at the end)."""
    seen = {}
    plan_or_restore = driver.plan_or_restore

    def spy(cfg, method, transport, checkpoint):
        seen["transport"] = transport
        return plan_or_restore(cfg, method, transport, checkpoint)

    monkeypatch.setattr(driver, "plan_or_restore", spy)
    return seen


def test_a_method_that_trains_and_sends_only_heads_leaves_adapters_untouched(make_config, monkeypatch, transport_of):
    monkeypatch.setitem(METHODS, "fedavg_cluster", HeadsOnly)
    force_clusters(monkeypatch, GROUPS)
    result, _ = run_and_save(make_config(method="fedavg_cluster"), progress=False)
    transport = transport_of["transport"]
    states = transport.states()
    for cid, state in states.items():
        initial = transport.initial[cid]
        for key in select(state, ("lora_A", "lora_B")):
            assert torch.equal(state[key], initial[key]), key  # never trained, never replaced
        heads = select(state, ("head",))
        assert any(not torch.equal(heads[k], initial[k]) for k in heads)  # trained and averaged
        partner = states[cid ^ 1]
        assert all(torch.equal(heads[k], partner[k]) for k in heads)  # the group's mean head
    head_bytes = {cid: sum(t.numel() * 4 for t in select(s, ("head",)).values()) for cid, s in states.items()}
    for entry in result["round_metrics"]:
        for c in entry["clients"]:
            assert c["bytes_up"] == c["bytes_down"] == head_bytes[c["client_id"]]


def _shard_model(make_config):
    transport = inprocess.set_up(make_config(method="local_only"))
    fm, shard = transport.fm, transport.shards[0]
    fm.add_client(shard.client_id, {m: 4 for m in fm.modules}, transport.tasks[shard.task].num_labels)
    return fm, shard.client_id, transport.train_enc[shard.client_id]


@pytest.mark.parametrize("together", [False, True], ids=["one client", "client batching"])
def test_the_extra_loss_term_enters_every_step(make_config, together):
    """A term c·Σθ far steeper than the cross-entropy makes AdamW's every step -lr on every trained parameter
    (its update is m̂/√v̂ = sign of a constant gradient; clipping scales all coordinates alike), so after n batches
    each parameter sits n·lr below its start. Every call gets the trained parameters and their values at the
    round's start."""
    fm, cid, encoded = _shard_model(make_config)
    start, calls, lr = fm.get_state(cid), [], 1e-3
    begin = [t.clone() for t in start.values()]  # get_state's order is trainable_parameters' order

    def steep(params, begun):
        calls.append(len(params) == len(begin) and all(torch.equal(b, s) for b, s in zip(begun, begin)))
        return 1e3 * sum(p.sum() for p in params)

    kw = dict(epochs=1, lr=lr, batch_size=8, extra_loss=steep)
    if together:
        train_clients(fm, [TrainJob(cid, encoded, 1)], **kw)
    else:
        train_local(fm, cid, encoded, seed=1, **kw)
    steps = -(-len(encoded) // 8)
    assert len(calls) == steps and all(calls)
    for key, tensor in fm.get_state(cid).items():
        torch.testing.assert_close(tensor - start[key], torch.full_like(tensor, -steps * lr), rtol=0.02, atol=0)


def test_an_inprocess_client_whose_training_raises_is_left_out_and_rejoins(make_config, monkeypatch):
    force_clusters(monkeypatch, GROUPS)
    real = inprocess.train_client

    def failing(fm, cid, encoded, *, seed, **kw):
        if cid == 1 and seed == client_seed(0, 2, 1):
            for p in fm.trainable_parameters(cid):
                p.data.add_(1.0)  # part of a step ran and changed the weights before the failure
            raise RuntimeError("injected failure in train of round 2")
        return real(fm, cid, encoded, seed=seed, **kw)

    monkeypatch.setattr(inprocess, "train_client", failing)
    result, _ = run_and_save(make_config(method="fedavg_cluster", rounds=3), progress=False)
    first, second, third = result["round_metrics"]
    assert first["missing_clients"] == [] and third["missing_clients"] == []
    assert second["missing_clients"] == [1]
    assert "injected failure in train of round 2" in second["missing_reasons"]["1"]
    d1, d2, d3 = first["state_digests"], second["state_digests"], third["state_digests"]
    # Client 1 keeps its round-1 state exactly; its partner's aggregate is its partner's alone.
    assert d2["1"] == d1["1"] and d2["0"] not in (d1["0"], d2["1"])
    assert d2["2"] == d2["3"]
    kept = {c["client_id"]: c for c in second["clients"]}[1]
    assert kept["missing"] is True and kept["metrics_from_round"] == 1
    assert (kept["bytes_up"], kept["bytes_down"]) == (0, 0)
    assert d3["0"] == d3["1"] and d3["2"] == d3["3"]  # it rejoined its group
