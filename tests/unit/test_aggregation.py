import pytest
import torch

from atlasfl.errors import AtlasError
from atlasfl.phases.aggregation import (
    aggregate_states,
    lora_delta,
    refactor,
    svd_aggregate,
    weighted_mean,
    zero_pad_fedavg,
)

F64 = torch.float64
ALPHA = 16.0


def make_factors(ranks, d_out=12, d_in=10, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype), ALPHA / r)
        for r in ranks
    ]


def mean_delta(factors, weights):
    total = sum(weights)
    return sum(w / total * lora_delta(A, B, s) for w, (A, B, s) in zip(weights, factors))


def truncate(matrix, rank):
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def test_weighted_mean_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    assert torch.allclose(weighted_mean([a, b], [1, 1]), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    assert torch.allclose(weighted_mean([a, b], [3, 1]), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert torch.allclose(weighted_mean([a, b], [0, 2]), b)
    assert weighted_mean([a, b], [1, 1]).dtype == torch.float32


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1], [float("nan"), 1]])
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_mean([torch.zeros(2), torch.ones(2)], weights)


def test_refactor_is_exact_at_full_rank_and_pads():
    (A, B, s), = make_factors([3])
    delta = lora_delta(A, B, s)
    A2, B2 = refactor(delta, 3, ALPHA / 3)
    assert torch.allclose(lora_delta(A2, B2, ALPHA / 3), delta, atol=1e-10)
    A5, B5 = refactor(delta, 15, ALPHA / 15)  # more than min(d_out, d_in) = 10: zero padding
    assert A5.shape == (15, 10) and B5.shape == (12, 15)
    assert torch.all(A5[10:] == 0) and torch.all(B5[:, 10:] == 0)
    assert torch.allclose(lora_delta(A5, B5, ALPHA / 15), delta, atol=1e-10)


def test_refactor_keeps_dtype_and_balances_factors():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    A, B = refactor(delta, 2, 0.5)
    assert A.dtype == B.dtype == torch.float32
    # B = U√(S/scale), A = √(S/scale)Vᵀ: column norms of B equal row norms of A.
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), atol=1e-5)
    assert torch.allclose(lora_delta(A, B, 0.5), truncate(delta.double(), 2).float(), atol=1e-5)


def test_svd_aggregate_exact_when_ranks_cover_target():
    factors = make_factors([3, 4, 5])
    for A, _, _ in factors:
        A[1:] = 0  # every client's ΔW has rank 1, so the target has rank ≤ 3 ≤ every rank
    weights = [1.0, 2.0, 5.0]
    target = mean_delta(factors, weights)
    for (A, B), (A0, B0, s) in zip(svd_aggregate(factors, weights), factors):
        assert A.shape == A0.shape and B.shape == B0.shape
        assert torch.allclose(lora_delta(A, B, s), target, atol=1e-5)


def test_svd_aggregate_exact_with_heterogeneous_ranks():
    factors = make_factors([1, 1, 8], d_out=20, d_in=16)
    weights = [3.0, 1.0, 0.0]  # the rank-8 client has no weight: target rank 2
    target = mean_delta(factors, weights)
    assert torch.linalg.matrix_rank(target) == 2
    for (A, B), (A0, _, s) in zip(svd_aggregate(factors, weights), factors):
        assert A.shape == A0.shape
        if A0.shape[0] >= 2:
            assert torch.allclose(lora_delta(A, B, s), target, atol=1e-5)


def test_svd_aggregate_low_rank_is_best_approximation():
    factors = make_factors([4, 8, 16], d_out=24, d_in=20, seed=3)
    weights = [1.0, 1.0, 2.0]
    target = mean_delta(factors, weights)
    g = torch.Generator().manual_seed(7)
    for (A, B), (A0, _, s) in zip(svd_aggregate(factors, weights), factors):
        r = A0.shape[0]
        approx = lora_delta(A, B, s)
        assert torch.allclose(approx, truncate(target, r), atol=1e-5)
        error = (approx - target).norm()
        for _ in range(20):
            random = torch.randn(24, r, generator=g, dtype=F64) @ torch.randn(r, 20, generator=g, dtype=F64)
            assert error <= (random - target).norm()


def test_zero_pad_fedavg_by_hand():
    A1, B1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]])  # rank 1
    A2 = torch.tensor([[3.0, 4.0], [5.0, 6.0]])  # rank 2
    B2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (nA1, nB1), (nA2, nB2) = zero_pad_fedavg([(A1, B1), (A2, B2)], [1, 3])
    # A: 0.25·[[1,2],[0,0]] + 0.75·[[3,4],[5,6]] = [[2.5,3.5],[3.75,4.5]]
    # B: 0.25·[[1,0],[3,0]] + 0.75·[[1,2],[3,4]] = [[1,1.5],[3,3]]
    assert torch.equal(nA2, torch.tensor([[2.5, 3.5], [3.75, 4.5]]))
    assert torch.equal(nB2, torch.tensor([[1.0, 1.5], [3.0, 3.0]]))
    assert torch.equal(nA1, torch.tensor([[2.5, 3.5]]))
    assert torch.equal(nB1, torch.tensor([[1.0], [3.0]]))


def state(A, B, head_w, head_b):
    return {"lora::enc.0.q::A": A, "lora::enc.0.q::B": B,
            "head::classifier.weight": head_w, "head::classifier.bias": head_b}


def test_fedavg_mode_by_hand():
    s1 = state(torch.ones(2, 3), torch.ones(4, 2), torch.zeros(2, 4), torch.zeros(2))
    s2 = state(3 * torch.ones(2, 3), torch.zeros(4, 2), torch.ones(2, 4), torch.ones(2))
    avg, again = aggregate_states([s1, s2], [1, 1], alpha=ALPHA, mode="fedavg")
    assert avg.keys() == s1.keys()
    assert torch.equal(avg["lora::enc.0.q::A"], 2 * torch.ones(2, 3))
    assert torch.equal(avg["lora::enc.0.q::B"], 0.5 * torch.ones(4, 2))
    assert torch.equal(avg["head::classifier.bias"], 0.5 * torch.ones(2))
    assert all(torch.equal(avg[k], again[k]) for k in avg)


def plain_fedavg(states, weights):
    """Homogeneous FedAvg written out: the weighted mean of every tensor, key by key."""
    total = sum(weights)
    return {key: sum(w * s[key] for s, w in zip(states, weights)) / total for key in states[0]}


def test_fedavg_mode_with_equal_ranks_is_plain_fedavg():
    g = torch.Generator().manual_seed(0)
    states = [
        state(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), torch.randn(2, 5, generator=g),
              torch.randn(2, generator=g))
        for _ in range(3)
    ]
    weights = [100, 250, 50]
    expected = plain_fedavg(states, weights)
    for out in aggregate_states(states, weights, alpha=ALPHA, mode="fedavg"):
        for key, value in expected.items():
            assert torch.allclose(out[key], value, atol=1e-6)


def test_svd_mode_with_equal_ranks_gives_everyone_the_same_delta():
    g = torch.Generator().manual_seed(1)
    states = [state(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), torch.zeros(2, 5), torch.zeros(2))
              for _ in range(3)]
    outs = aggregate_states(states, [1, 1, 1], alpha=ALPHA, mode="svd")
    deltas = [lora_delta(o["lora::enc.0.q::A"], o["lora::enc.0.q::B"], ALPHA / 4) for o in outs]
    for d in deltas[1:]:
        assert torch.allclose(d, deltas[0], atol=1e-5)
    mean = sum(lora_delta(s["lora::enc.0.q::A"].double(), s["lora::enc.0.q::B"].double(), ALPHA / 4)
               for s in states) / 3
    target = truncate(mean, 4)
    assert torch.allclose(deltas[0].double(), target, atol=1e-4)


@pytest.mark.parametrize("mode", ["svd", "fedavg"])
def test_aggregate_states_keeps_keys_shapes_and_groups_heads(mode):
    g = torch.Generator().manual_seed(2)
    ranks, labels = [2, 4, 8, 4], [2, 2, 3, 3]
    states = [
        {
            "lora::blocks.0.attn.q::A": torch.randn(r, 6, generator=g),
            "lora::blocks.0.attn.q::B": torch.randn(7, r, generator=g),
            "lora::blocks.1.attn.v::A": torch.randn(r, 6, generator=g),
            "lora::blocks.1.attn.v::B": torch.randn(5, r, generator=g),
            "head::score.weight": torch.full((n, 7), float(k)),
        }
        for k, (r, n) in enumerate(zip(ranks, labels))
    ]
    before = [{key: t.clone() for key, t in s.items()} for s in states]
    outs = aggregate_states(states, [1, 1, 1, 3], alpha=ALPHA, mode=mode)
    for s, out, old in zip(states, outs, before):
        assert list(out) == list(s)
        assert all(out[key].shape == s[key].shape and out[key].dtype == s[key].dtype for key in s)
        assert all(torch.equal(s[key], old[key]) for key in s)  # inputs untouched
    # Two-label heads (clients 0, 1) average together, three-label heads (2, 3) with weights 1:3.
    assert torch.allclose(outs[0]["head::score.weight"], torch.full((2, 7), 0.5))
    assert torch.allclose(outs[1]["head::score.weight"], torch.full((2, 7), 0.5))
    assert torch.allclose(outs[2]["head::score.weight"], torch.full((3, 7), 2.75))
    assert outs[2]["head::score.weight"] is not outs[3]["head::score.weight"]


def test_aggregate_states_rejects_bad_input():
    s = state(torch.ones(2, 3), torch.ones(4, 2), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(AtlasError):
        aggregate_states([s, s], [1, 1], alpha=ALPHA, mode="mean")
    with pytest.raises(ValueError):
        aggregate_states([s, {"lora::x::A": torch.ones(2, 3)}], [1, 1], alpha=ALPHA, mode="svd")
    with pytest.raises(ValueError):
        aggregate_states([{"weird": torch.ones(1)}], [1], alpha=ALPHA, mode="svd")
