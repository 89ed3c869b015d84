"""fedrep end to end on a tiny model: its two phases freeze what they should (the gradients show it), and heads
never leave the client (the bytes show it)."""
from __future__ import annotations

import pytest
import torch

from atlasfl.engines import inprocess
from atlasfl.experiment import run_and_save
from atlasfl.federation.training import TrainJob, train_client, train_cohort
from atlasfl.methods import method_for
from atlasfl.methods.base import select
from tests.conftest import state_floats


def _client(make_config, **kw):
    """One fedrep client on the tiny model with a trained-looking adapter (PEFT's B = 0 would hide A's gradient)."""
    transport = inprocess.set_up(make_config(method="fedrep", **kw))
    fm, shard = transport.fm, transport.shards[0]
    cid = shard.client_id
    fm.add_client(cid, {m: 4 for m in fm.modules}, transport.tasks[shard.task].num_labels)
    noise = torch.Generator().manual_seed(0)
    fm.set_state(cid, {k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in fm.get_state(cid).items()})
    return fm, cid, transport.train_enc[cid], method_for(transport.cfg)


@pytest.mark.parametrize("together", [False, True], ids=["one client", "client batching"])
def test_the_head_phase_freezes_the_adapter_and_the_adapter_phase_freezes_the_head(make_config, monkeypatch,
                                                                                   together):
    fm, cid, encoded, method = _client(make_config, fedrep_head_epochs=2, fedrep_body_epochs=1)
    adapter, head = fm.trainable_parameters(cid, ("lora_A", "lora_B")), fm.trainable_parameters(cid, ("head",))
    calls = []  # per forward pass: (adapter requires grad, head requires grad, state and gradients before it)

    def spy(forward):
        def wrapped(*args):
            calls.append(([p.requires_grad for p in adapter], [p.requires_grad for p in head], fm.get_state(cid),
                          [None if p.grad is None else p.grad.clone() for p in adapter + head]))
            return forward(*args)
        return wrapped

    monkeypatch.setattr(fm, "routed_logits" if together else "logits", spy(getattr(fm, "routed_logits" if together
                                                                                     else "logits")))
    start = fm.get_state(cid)
    kw = dict(method=method, lr=1e-2, batch_size=8)
    if together:
        train_cohort(fm, [TrainJob(cid, encoded, 7)], **kw)
    else:
        train_client(fm, cid, encoded, seed=7, **kw)
    end = fm.get_state(cid)
    steps = -(-len(encoded) // 8)  # batches per epoch
    assert len(calls) == 3 * steps
    head_phase, adapter_phase = calls[:2 * steps], calls[2 * steps:]
    assert all(not any(a) and all(h) for a, h, _, _ in head_phase)
    assert all(all(a) and not any(h) for a, h, _, _ in adapter_phase)
    boundary, grads = adapter_phase[0][2], adapter_phase[0][3]  # the state after the head's epochs
    n = len(adapter)
    assert all(g is None for g in grads[:n]) and all(g is not None for g in grads[n:])  # no adapter gradient yet
    for key in select(start, ("lora_A", "lora_B")):
        assert torch.equal(boundary[key], start[key]) and not torch.equal(end[key], boundary[key]), key
    for key in select(start, ("head",)):
        assert not torch.equal(boundary[key], start[key]) and torch.equal(end[key], boundary[key]), key
    for p, g in zip(head, grads[n:]):
        assert torch.equal(p.grad, g)  # the adapter's phase computed no gradient of the head


def test_fedrep_sends_only_adapters_each_way_and_every_head_stays_its_clients_own(make_config, monkeypatch):
    states = []
    evaluate = inprocess.InProcess.evaluate

    def spy(self, round_idx, trained, validate, test=True):
        states.append(self.states())
        return evaluate(self, round_idx, trained, validate, test)

    monkeypatch.setattr(inprocess.InProcess, "evaluate", spy)
    cfg = make_config(method="fedrep", fedrep_head_epochs=1)
    result, _ = run_and_save(cfg, progress=False)
    ranks = {m: cfg.homogeneous_rank for m in result["ranks"]["0"]}
    adapter = 4 * (state_floats("tiny-bert", ranks, num_labels=2) - 2 * 32 - 2)  # float32; a 32×2 head with bias
    assert adapter == 4 * 4 * 4 * (32 + 32)  # four adapted 32×32 projections at r = 4
    assert [[(c["bytes_up"], c["bytes_down"]) for c in r["clients"]] for r in result["round_metrics"]] == \
        [[(adapter, adapter)] * 4] * cfg.rounds
    assert result["communication_costs"]["total_bytes_up"] == cfg.rounds * 4 * adapter
    for round_states in states:
        for part, shared in (("lora_A", True), ("lora_B", True), ("head", False)):
            for key in select(round_states[0], (part,)):
                distinct = {s[key].numpy().tobytes() for s in round_states.values()}
                assert len(distinct) == (1 if shared else len(round_states)), key
