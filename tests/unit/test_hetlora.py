"""`hetlora`: sparsity-weighted zero-padded means truncated to each client's ranks, and the tail-rank regulariser."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import Group
from atlasfl.methods.hetlora import lora_pairs, tail_penalty
from atlasfl.phases.aggregation import sparsity_weighted_zero_pad

F64 = torch.float64
Q = "lora::enc.0.q::"


def _cfg(**kw):
    return build_config("tiny-bert", 0, "hetlora", **kw)


def t(rows):
    return torch.tensor(rows, dtype=F64)


# Client 0, rank 1: B₀A₀ = [[1,0],[0,0]], ‖·‖_F = 1. Client 1, rank 2: B₁A₁ = [[0,0],[0,3]], ‖·‖_F = 3.
A0, B0 = t([[1, 0]]), t([[1], [0]])
A1, B1 = t([[0, 3], [1, 0]]), t([[0, 0], [1, 0]])


def test_sparsity_weighted_zero_pad_by_hand():
    # Weights 1/4, 3/4 (not the shard sizes 3:1 given as fallback). Padded A₀ = [[1,0],[0,0]], B₀ = [[1,0],[0,0]]:
    # A = 1/4·[[1,0],[0,0]] + 3/4·[[0,3],[1,0]] = [[0.25,2.25],[0.75,0]]; B = 1/4·[[1,0],[0,0]] + 3/4·[[0,0],[1,0]]
    # = [[0.25,0],[0.75,0]]. Client 0 keeps row 0 of A and column 0 of B.
    (a0, b0), (a1, b1) = sparsity_weighted_zero_pad([(A0, B0), (A1, B1)], [3, 1])
    assert torch.equal(a1, t([[0.25, 2.25], [0.75, 0]])) and torch.equal(b1, t([[0.25, 0], [0.75, 0]]))
    assert torch.equal(a0, t([[0.25, 2.25]])) and torch.equal(b0, t([[0.25], [0.75]]))


def test_sparsity_weights_ignore_a_client_without_update_and_fall_back_to_sizes_when_all_are_empty():
    idle = (t([[5, 5]]), t([[0], [0]]))  # B = 0: ‖BA‖ = 0, its A carries no weight
    (a0, _), (a1, b1), (a2, _) = sparsity_weighted_zero_pad([(A0, B0), (A1, B1), idle], [1, 1, 100])
    assert torch.equal(a1, t([[0.25, 2.25], [0.75, 0]])) and torch.equal(b1, t([[0.25, 0], [0.75, 0]]))
    assert torch.equal(a2, t([[0.25, 2.25]]))
    # Nobody has an update yet (B = 0 everywhere, as LoRA starts): shard sizes 3:1 weight the A factors.
    (a0, b0), (a1, _) = sparsity_weighted_zero_pad([(A0, 0 * B0), (A1, 0 * B1)], [3, 1])
    assert torch.equal(a1, t([[0.75, 0.75], [0.25, 0]])) and torch.equal(b0, t([[0], [0]]))


def test_hetlora_method_aggregates_adapters_by_sparsity_and_heads_by_shard_size():
    heads = [torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)]
    states = [{Q + "A": A, Q + "B": B, "head::classifier.weight": h} for (A, B), h in zip([(A0, B0), (A1, B1)], heads)]
    cfg = _cfg()
    new0, new1 = method_for(cfg).aggregate(states, Group(clients=[0, 1], sizes=[3, 1], fingerprints=None, cfg=cfg,
                                                         eta=cfg.eta))
    assert list(new0) == list(states[0])
    assert torch.equal(new0[Q + "A"], t([[0.25, 2.25]])) and torch.equal(new1[Q + "B"], t([[0.25, 0], [0.75, 0]]))
    for new in (new0, new1):  # heads: 3/4·0 + 1/4·1
        assert torch.equal(new["head::classifier.weight"], torch.full((2, 2), 0.25, dtype=F64))


def test_hetlora_is_registered_after_flexlora_with_its_settings_and_refuses_svd():
    names = list(METHODS)
    assert names.index("flexlora") < names.index("hetlora") < names.index("atlas_no_laplacian")
    method = method_for(_cfg())
    assert method.heterogeneous_ranks and method.groups([0, 1, 2], [0, 0, 1]) == [[0, 1, 2]]
    assert (method.cfg.hetlora_lambda, method.cfg.hetlora_gamma) == (0.01, 0.99)
    assert method_for(_cfg(hetlora_lambda=0.0)).extra_loss() is None
    with pytest.raises(AtlasError, match="--aggregation svd is flexlora's rule"):
        _cfg(aggregation="svd")
    with pytest.raises(AtlasError):
        _cfg(hetlora_gamma=0.0)


def test_regulariser_has_a_gradient_on_the_tail_ranks_only():
    # Module of rank 2 at γ = 0.99: ⌊1.98⌋ = 1, the tail is rank index 1. B[:,1] = e₁, A[1] = [0,3,4]:
    # ‖B[:,1:]A[1:]‖_F = ‖e₁‖·‖(0,3,4)‖ = 5. d/dB[:,1] = B[:,1]·‖a‖²/5 = 5·e₁, d/dA[1] = a·‖b‖²/5 = (0,0.6,0.8).
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]], requires_grad=True)
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    weight, bias = torch.ones(2, 4, requires_grad=True), torch.zeros(2, requires_grad=True)  # an encoder head
    params = [A, B, weight, bias]
    assert lora_pairs(params) == [(A, B)]
    loss = method_for(_cfg(hetlora_lambda=0.1)).extra_loss()(params, [p.detach() for p in params])
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(B.grad, torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(A.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.06, 0.08]]))
    assert weight.grad is None and bias.grad is None  # the head is not regularised
    # γ = 1 keeps every rank: no term.
    assert tail_penalty([(A, B)], 1.0) == 0.0


def test_regulariser_finds_every_module_of_a_real_client():
    from atlasfl.models.lora import FederatedLoRAModel
    from atlasfl.models.registry import load_backbone

    for model in ("tiny-bert", "tiny-gpt2"):  # encoder head: weight and bias; decoder head: weight alone
        fm = FederatedLoRAModel(load_backbone(model, init="random"), alpha=16.0, dropout=0.0, seed=0)
        ranks = {m: 2 + i for i, m in enumerate(fm.module_shapes())}
        fm.add_client(0, ranks, num_labels=2)
        pairs = lora_pairs(fm.trainable_parameters(0))
        assert [A.shape[0] for A, _ in pairs] == list(ranks.values())
        assert all(B.shape[1] == A.shape[0] for A, B in pairs)
