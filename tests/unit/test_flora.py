"""`flora`: the group's factors stacked (exact Σ p_k ΔW_k at heterogeneous ranks), merged into each client's frozen
residual, every client restarting from a fresh LoRA; and the residual a client's forward adds."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.federation.training import client_seed
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import Group, part_of
from atlasfl.phases.stacking import fresh_lora, stack_factors
from tests.conftest import peft_oracle_adapters

F64 = torch.float64
Q = "lora::enc.0.q::"
HEAD = "head::classifier.weight"


def _cfg(**kw):
    return build_config("tiny-bert", 0, "flora", **kw)


def test_flora_is_registered_before_atlas_no_laplacian_with_device_ranks_and_a_residual():
    names = list(METHODS)
    assert names.index("hetlora") < names.index("flora") < names.index("atlas_no_laplacian")
    method = method_for(_cfg())
    assert method.heterogeneous_ranks and method.keeps_residual and method.uses_fingerprints
    assert method.groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1, 2, 3]]
    assert method_for(_cfg(sharing="cluster")).groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1], [2, 3]]
    assert [part_of(Q + p) for p in "ABR"] == ["lora_A", "lora_B", "residual"]


@pytest.mark.parametrize("mode", ["svd", "fedavg"])
def test_flora_refuses_an_aggregation_in_one_line(mode):
    with pytest.raises(AtlasError) as err:
        _cfg(aggregation=mode)
    assert str(err.value) == (f"invalid settings: flora stacks the factors, which is already exact, so "
                              f"--aggregation {mode} cannot apply; drop it")


def _three_clients():
    """alpha = 2; ranks 1, 2, 1 (scales 2, 1, 2); shards 2, 1, 1 (p = 1/2, 1/4, 1/4).
    ΔW_0 = 2·[1,2]ᵀ[1,0] = [[2,0],[4,0]]; ΔW_1 = 1·I·[[0,1],[1,1]] = [[0,1],[1,1]];
    ΔW_2 = 2·[0,1]ᵀ[1,1] = [[0,0],[2,2]].
    Σ p_k ΔW_k = [[1,0],[2,0]] + [[0,1/4],[1/4,1/4]] + [[0,0],[1/2,1/2]] = [[1,1/4],[11/4,3/4]]."""
    factors = [([[1.0, 0.0]], [[1.0], [2.0]]), ([[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]),
               ([[1.0, 1.0]], [[0.0], [1.0]])]
    states = [{Q + "A": torch.tensor(A), Q + "B": torch.tensor(B), HEAD: torch.full((2, 2), float(k))}
              for k, (A, B) in enumerate(factors)]
    cfg = _cfg(lora_alpha=2.0)
    return cfg, states, Group(clients=[0, 1, 2], sizes=[2, 1, 1], fingerprints=None, cfg=cfg, eta=cfg.eta)


def test_flora_stacks_p_k_s_k_a_k_and_b_k_by_hand_at_ranks_1_2_1():
    cfg, states, group = _three_clients()
    new = method_for(cfg).aggregate(states, group)
    # A_glob = [p_0 s_0 A_0; p_1 s_1 A_1; p_2 s_2 A_2] with p_k s_k = 1, 1/4, 1/2; B_glob = [B_0 B_1 B_2].
    A = torch.tensor([[1.0, 0.0], [0.0, 0.25], [0.25, 0.25], [0.5, 0.5]])
    B = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    for state in new:  # every member gets the same stacked pair (rank 4 = 1 + 2 + 1) and the mean head
        assert torch.equal(state[Q + "A"], A) and torch.equal(state[Q + "B"], B)
        assert torch.equal(state[HEAD], torch.full((2, 2), 0.5 * 0 + 0.25 * 1 + 0.25 * 2))
    assert torch.equal(B @ A, torch.tensor([[1.0, 0.25], [2.75, 0.75]]))


def test_flora_receive_merges_into_the_residual_and_restarts_from_a_fresh_seeded_lora():
    cfg, states, group = _three_clients()
    method = method_for(cfg)
    received = method.aggregate(states, group)[1]
    old = {Q + "R": torch.tensor([[1.0, 1.0], [0.0, -1.0]])}
    new = method.receive(received, old, ranks={"enc.0.q": 2}, cid=1, round_idx=3)
    assert set(new) == {Q + "A", Q + "B", Q + "R", HEAD}
    assert torch.equal(new[Q + "R"], torch.tensor([[2.0, 1.25], [2.75, -0.25]]))  # old + Σ p_k ΔW_k
    expected_A, _ = fresh_lora(2, 2, 2, torch.Generator().manual_seed(client_seed(cfg.seed, 3, 1)))
    assert torch.equal(new[Q + "A"], expected_A) and torch.equal(new[Q + "B"], torch.zeros(2, 2))
    assert new[Q + "A"].abs().max() <= 2 ** -0.5 and new[Q + "A"].abs().min() > 0  # PEFT's U(±1/√d_in)
    assert torch.equal(new[HEAD], received[HEAD])
    # No residual yet (a client's start, as the Flower server's copy holds it): the zero residual.
    assert torch.equal(method.receive(received, {}, ranks={"enc.0.q": 2}, cid=1, round_idx=3)[Q + "R"],
                       torch.tensor([[1.0, 0.25], [2.75, 0.75]]))
    other = method.receive(received, old, ranks={"enc.0.q": 2}, cid=1, round_idx=4)
    assert not torch.equal(other[Q + "A"], new[Q + "A"])  # a new draw each round


def test_flora_stacking_is_peft_cat_merge():
    """Oracle: peft's `add_weighted_adapter(combination_type="cat")` concatenates w_k·scale_k·A_k and B_k, at
    lora_alpha = Σ r_k (scale 1); ours must give the same factors and the same update."""
    alpha, ranks, sizes = 16.0, [1, 2, 4], [5, 2, 3]
    model, layer, names, pairs = peft_oracle_adapters(alpha, ranks, d_in=7, d_out=6)
    factors = [(A, B, alpha / r) for (A, B), r in zip(pairs, ranks)]
    weights = [n / sum(sizes) for n in sizes]
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    A, B = stack_factors(factors, sizes)
    assert layer.scaling["cat"] == 1.0 and A.shape == (sum(ranks), 7)
    torch.testing.assert_close(A, layer.lora_A["cat"].weight.data, rtol=1e-14, atol=0)
    assert torch.equal(B, layer.lora_B["cat"].weight.data)
    exact = sum(p * s * Bk @ Ak for p, (Ak, Bk, s) in zip(weights, factors))
    torch.testing.assert_close(layer.get_delta_weight("cat"), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B @ A, exact, rtol=1e-12, atol=1e-12)
