"""`flora` end to end on tiny models: a client's forward adds its residual in nn.Linear orientation (GPT-2's Conv1D
included); after every round each client holds the group's exact mean update merged into its residual and a
fresh LoRA; the bytes are what travels (the stacked factors down); resume is exact; a lone client's residual
stays in the Flower server's copy. (Flower's equality with the in-process engine over all clients:
test_hetero_methods.)"""
from __future__ import annotations

import pytest
import torch

import atlasfl.results.checkpoint as ckpt
from atlasfl.experiment import run_and_save
from atlasfl.federation.training import client_seed
from atlasfl.methods.base import select
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.registry import load_backbone
from atlasfl.phases.stacking import fresh_lora
from tests.conftest import (
    HETERO_DEVICES,
    comparable,
    force_clusters,
    interrupt_at_checkpoint,
    outcome,
    saved_result,
    state_floats,
)


def _batch(fm):
    return fm.backbone.tokenizer(["the cat sat on the mat", "a b"], padding=True, return_tensors="pt")


def _base_plus_residual(fm, cid, batch):
    """The frozen base's hidden states (eval mode) with the client's residuals merged into its weights (Conv1D:
    transposed), adapters off; the weights are left as they were."""
    residuals = fm.residuals.of[cid]
    fm.activate(cid, train=False)
    with torch.no_grad():
        weights = {m: fm.base_weight(m) for m in residuals}
        saved = {m: w.clone() for m, w in weights.items()}
        for m, w in weights.items():
            conv1d = type(fm.backbone.model.get_submodule(m).base_layer).__name__ == "Conv1D"
            w += residuals[m].T if conv1d else residuals[m]
        merged = fm.hidden_states(batch, adapters=False)
        for m, w in weights.items():
            w.copy_(saved[m])
    return merged


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_a_clients_forward_adds_its_own_residual_in_linear_orientation(model):
    fm = FederatedLoRAModel(load_backbone(model, init="random"), alpha=16.0, dropout=0.0, seed=0)
    ranks = {m: 2 for m in fm.modules}
    fm.add_client(0, ranks, 2, residual=True)
    fm.add_client(1, ranks, 2)
    g = torch.Generator().manual_seed(1)
    fm.set_state(0, {f"lora::{m}::R": 0.1 * torch.randn(shape, generator=g) for m, shape in fm.module_shapes().items()},
                 partial=True)
    batch = _batch(fm)
    with torch.no_grad():
        fm.activate(1, train=False)  # eval mode: no dropout in the base either
        base = fm.hidden_states(batch, adapters=False)
        assert torch.equal(fm.hidden_states(batch), base)  # B = 0 and no residual: the base alone
        fm.activate(0, train=False)
        ours = fm.hidden_states(batch)
        logits = fm.logits(0, batch)
        with fm.training_together([0, 1]):  # the shared pass of training, here without dropout, adds it too
            fm.peft.train(False)
            routed = fm.routed_logits([(0, 0, 1), (1, 1, 2)], batch)
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(ours, _base_plus_residual(fm, 0, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[0], logits[:1], rtol=1e-5, atol=1e-5)


def test_after_each_round_every_client_holds_the_exact_mean_update_in_its_residual_and_a_fresh_lora(
        make_config, deliveries):
    cfg = make_config(method="flora", devices=HETERO_DEVICES)
    result = saved_result(cfg)
    ranks = {int(c): r for c, r in result["ranks"].items()}
    assert len({tuple(r.values()) for r in ranks.values()}) > 1  # heterogeneous ranks
    assert [d[0] for d in deliveries] == list(range(1, cfg.rounds + 1))
    for round_idx, before, after, transport in deliveries:
        fm, total = transport.fm, sum(len(s.train) for s in transport.shards)
        weights = {s.client_id: len(s.train) / total for s in transport.shards}  # every client replies here
        for m in fm.modules:
            a, b, r = (f"lora::{m}::{p}" for p in "ABR")
            mean = sum(p * (cfg.lora_alpha / before[c][a].shape[0]) * before[c][b].double() @ before[c][a].double()
                       for c, p in weights.items())
            for cid, state in after.items():
                torch.testing.assert_close(state[r].double(), before[cid][r].double() + mean, rtol=1e-5, atol=1e-6)
                assert torch.equal(state[r], after[0][r])  # one group: one residual
        for cid, state in after.items():
            draws = torch.Generator().manual_seed(client_seed(cfg.seed, round_idx, cid))
            for m, rank in ranks[cid].items():
                A, B = fresh_lora(rank, *reversed(fm.module_shapes()[m]), draws)
                assert torch.equal(state[f"lora::{m}::A"], A) and torch.equal(state[f"lora::{m}::B"], B)
            assert all(torch.equal(v, after[0][k]) for k, v in select(state, ("head",)).items())
    fm = deliveries[-1][3].fm
    with torch.no_grad():  # the fresh LoRA adds nothing: the client's model is the base plus its residual
        fm.activate(1, train=False)
        torch.testing.assert_close(fm.hidden_states(_batch(fm)), _base_plus_residual(fm, 1, _batch(fm)),
                                   rtol=1e-5, atol=1e-5)
    _assert_bytes(result, ranks, fm.module_shapes())


def _assert_bytes(result, ranks, shapes):
    """Up: each client's own state, r_k(d_in + d_out) per module and its head; down: the stacked factors,
    Σ_j r_j (d_in + d_out) per module, and the head, in float32."""
    head = 2 * 32 + 2  # binary tasks, hidden size 32, with bias
    down = 4 * (sum(sum(r[m] for r in ranks.values()) * (d_out + d_in) for m, (d_out, d_in) in shapes.items())
                + head)
    assert down == 4 * (sum(sum(r.values()) for r in ranks.values()) * 64 + head)  # tiny-bert: d_in = d_out = 32
    for entry in result["round_metrics"]:
        for c in entry["clients"]:
            assert c["bytes_up"] == 4 * state_floats("tiny-bert", ranks[c["client_id"]], num_labels=2)
            assert c["bytes_down"] == down
    comm = result["communication_costs"]
    assert comm["per_client_bytes_down"] == {str(c): len(result["round_metrics"]) * down for c in ranks}


def test_a_resumed_flora_run_equals_the_uninterrupted_one(make_config, tmp_path, monkeypatch):
    reference = comparable(saved_result(make_config(method="flora", rounds=3, output_dir=str(tmp_path / "a"))))
    cfg = make_config(method="flora", rounds=3, output_dir=str(tmp_path / "b"))
    interrupt_at_checkpoint(cfg, monkeypatch, write=4)  # dies before round 3's checkpoint
    _, states = ckpt.load_checkpoint(ckpt.complete_checkpoints(cfg.checkpoint_path)[-1])  # round 2's
    assert all(torch.count_nonzero(t) for t in select(states[0], ("residual",)).values())  # the residuals are kept
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert comparable(resumed) == reference


def test_in_clusters_a_lone_client_keeps_its_zero_residual_and_flower_agrees(make_config, tmp_path, monkeypatch):
    """Client 0 alone in its group sends nothing and merges nothing; on Flower its BACKUP carries its residual to
    the server's copy, whose digest the ServerApp checks against the client's every round."""
    force_clusters(monkeypatch, [0, 1, 1, 1])
    kw = dict(method="flora", sharing="cluster", devices=HETERO_DEVICES)
    inproc = saved_result(make_config(output_dir=str(tmp_path / "a"), **kw))
    flower = saved_result(make_config(output_dir=str(tmp_path / "b"), engine="flower", **kw))
    assert outcome(flower) == outcome(inproc)
    for result in (inproc, flower):
        assert result["communication_costs"]["per_client_bytes_down"]["0"] == 0
        assert result["communication_costs"]["per_client_bytes_down"]["1"] > 0
