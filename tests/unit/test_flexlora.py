"""`flexlora`: the shard-weighted mean ΔW over all clients, each client's own-rank truncated SVD of it."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import Group
from atlasfl.phases.aggregation import lora_delta
from tests.conftest import peft_oracle_adapters

F64 = torch.float64
Q = "lora::enc.0.q::"


def _cfg(**kw):
    return build_config("tiny-bert", 0, "flexlora", **kw)


def test_flexlora_is_registered_after_fedavg_cluster_with_device_ranks_and_svd():
    names = list(METHODS)
    assert names.index("fedavg_cluster") < names.index("flexlora") < names.index("atlas_no_laplacian")
    method = method_for(_cfg())
    assert method.heterogeneous_ranks and method.default_aggregation == "svd" and method.uses_fingerprints
    assert method.groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1, 2, 3]]
    assert method_for(_cfg(sharing="cluster")).groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1], [2, 3]]


def test_flexlora_refuses_fedavg_aggregation_in_one_line():
    with pytest.raises(AtlasError) as err:
        _cfg(aggregation="fedavg")
    assert str(err.value) == ("invalid settings: flexlora's rule is the SVD of the mean update; --aggregation "
                              "fedavg is another method (hetlora, or standard_fl at one rank): drop it")
    assert _cfg(aggregation="svd").aggregation == "svd"


def test_flexlora_by_hand_two_clients_at_ranks_1_and_2():
    # alpha = 2: client 0 (rank 1, scale 2) and client 1 (rank 2, scale 1), shards 3 and 1 (p = 3/4, 1/4).
    # ΔW_0 = 2·[1,1]ᵀ[2/3,2/3] = (4/3)·J, ΔW_1 = 1·(2I)·(2I) = 4I, J the 2×2 matrix of ones.
    # Mean: 3/4·(4/3)J + 1/4·4I = J + I = [[2,1],[1,2]], singular values 3 (along [1,1]/√2) and 1.
    # Rank 2 keeps it exactly; rank 1 keeps 3·([1,1]/√2)([1,1]/√2)ᵀ = 1.5·J.
    s0 = {Q + "A": torch.tensor([[2 / 3, 2 / 3]], dtype=F64), Q + "B": torch.tensor([[1.0], [1.0]], dtype=F64),
          "head::classifier.weight": torch.zeros(2, 2, dtype=F64)}
    s1 = {Q + "A": 2 * torch.eye(2, dtype=F64), Q + "B": 2 * torch.eye(2, dtype=F64),
          "head::classifier.weight": torch.ones(2, 2, dtype=F64)}
    cfg = _cfg(lora_alpha=2.0)
    group = Group(clients=[0, 1], sizes=[3, 1], fingerprints=None, cfg=cfg, eta=cfg.eta)
    new0, new1 = method_for(cfg).aggregate([s0, s1], group)
    assert new0[Q + "A"].shape == (1, 2) and new0[Q + "B"].shape == (2, 1)
    assert new1[Q + "A"].shape == (2, 2) and new1[Q + "B"].shape == (2, 2)
    assert torch.allclose(lora_delta(new1[Q + "A"], new1[Q + "B"], 1.0), torch.tensor([[2.0, 1.0], [1.0, 2.0]],
                                                                                       dtype=F64), atol=1e-12)
    assert torch.allclose(lora_delta(new0[Q + "A"], new0[Q + "B"], 2.0), torch.full((2, 2), 1.5, dtype=F64),
                          atol=1e-12)
    # Balanced factors: B = U√(S/scale), A = √(S/scale)Vᵀ, so client 0's factors are ±√(3/4)·[1,1].
    assert torch.allclose(new0[Q + "A"].abs(), torch.full((1, 2), 0.75 ** 0.5, dtype=F64), atol=1e-12)
    # Heads of one shape: the shard-weighted mean 3/4·0 + 1/4·1.
    for new in (new0, new1):
        assert torch.equal(new["head::classifier.weight"], torch.full((2, 2), 0.25, dtype=F64))


def test_flexlora_matches_peft_svd_merge_at_each_clients_rank():
    """Oracle: peft's `add_weighted_adapter(combination_type="svd")` merges Σ w_k·ΔW_k (its adapters' own scales)
    and truncates at `svd_rank` with scale 1 (lora_alpha = r); ours must apply the same update."""
    alpha, ranks, sizes = 16.0, [1, 2, 4], [5, 2, 3]
    model, layer, names, pairs = peft_oracle_adapters(alpha, ranks, d_in=7, d_out=6)
    states = [{Q + "A": A, Q + "B": B} for A, B in pairs]
    cfg = _cfg(lora_alpha=alpha)
    new = method_for(cfg).aggregate(states, Group(clients=[0, 1, 2], sizes=sizes, fingerprints=None, cfg=cfg,
                                                  eta=cfg.eta))
    weights = [n / sum(sizes) for n in sizes]
    for k, r in enumerate(ranks):
        model.add_weighted_adapter(names, weights, f"merged{k}", combination_type="svd", svd_rank=r)
        oracle = layer.get_delta_weight(f"merged{k}")
        ours = lora_delta(new[k][Q + "A"], new[k][Q + "B"], alpha / r)
        assert torch.linalg.matrix_rank(oracle) == r
        assert torch.allclose(ours, oracle, atol=1e-10)
