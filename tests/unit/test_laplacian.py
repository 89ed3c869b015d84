import math

import numpy as np
import pytest
import torch

from atlasfl.errors import AtlasError
from atlasfl.phases.aggregation import aggregate_states, lora_delta, refactor
from atlasfl.phases.laplacian import affinity, laplacian_step, personalise_states

ALPHA = 8.0


def test_affinity_by_hand():
    f = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # squared distances 1, 9, 4
    a = affinity(f, sigma=1.0)
    row0 = np.array([1.0, math.exp(-1), math.exp(-9)])
    assert np.allclose(a[0], row0 / row0.sum())
    row2 = np.array([math.exp(-9), math.exp(-4), 1.0])
    assert np.allclose(a[2], row2 / row2.sum())
    # Default sigma: median of the off-diagonal squared distances (1, 9, 4, twice each) = 4.
    assert np.allclose(affinity(f), affinity(f, sigma=4.0))


def test_affinity_rows_sum_to_one_and_guards():
    rng = np.random.default_rng(0)
    a = affinity(rng.normal(size=(6, 5)))
    assert a.shape == (6, 6)
    assert np.allclose(a.sum(axis=1), 1.0)
    assert np.all(np.diag(a) >= a.max(axis=1) - 1e-12)  # no one is closer than oneself
    assert np.allclose(affinity(np.ones((3, 4))), np.full((3, 3), 1 / 3))  # zero spread: sigma 1
    assert np.allclose(affinity(np.ones((1, 4))), [[1.0]])
    with pytest.raises(ValueError):
        affinity(np.ones((3, 4)), sigma=0.0)


def test_laplacian_step_by_hand():
    d1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    d2 = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    a = np.array([[0.75, 0.25], [0.5, 0.5]])
    n1, n2 = laplacian_step([d1, d2], a, eta=0.4)
    # n1 = d1 − 0.4·0.25·(d1 − d2) = 0.9·d1 + 0.1·d2;  n2 = d2 − 0.4·0.5·(d2 − d1) = 0.8·d2 + 0.2·d1
    assert torch.allclose(n1, torch.tensor([[0.9, 0.2], [0.0, 0.0]]))
    assert torch.allclose(n2, torch.tensor([[0.2, 1.6], [0.0, 0.0]]))
    assert n1.dtype == torch.float32


def test_eta_one_uniform_is_cluster_mean():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(3, 4, generator=g) for _ in range(3)]
    mean = sum(deltas) / 3
    for new in laplacian_step(deltas, np.full((3, 3), 1 / 3), eta=1.0):
        assert torch.allclose(new, mean, atol=1e-6)


def test_eta_zero_returns_same_objects():
    deltas = [torch.ones(2, 2), torch.zeros(2, 2)]
    out = laplacian_step(deltas, np.full((2, 2), 0.5), eta=0.0)
    assert all(o is d for o, d in zip(out, deltas))


def test_eta_out_of_range():
    with pytest.raises(AtlasError):
        laplacian_step([torch.ones(1)], np.ones((1, 1)), eta=1.5)


def make_states(ranks, head_labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "lora::layer.0.q::A": torch.randn(r, 6, generator=g, dtype=torch.float64),
            "lora::layer.0.q::B": torch.randn(5, r, generator=g, dtype=torch.float64),
            "head::out.weight": torch.randn(n, 5, generator=g, dtype=torch.float64),
        }
        for r, n in zip(ranks, head_labels)
    ]


def delta_of(state):
    A, B = state["lora::layer.0.q::A"], state["lora::layer.0.q::B"]
    return lora_delta(A, B, ALPHA / A.shape[0])


def test_personalise_eta_zero_is_identity():
    states = make_states([2, 4], [2, 2])
    out = personalise_states(states, np.full((2, 2), 0.5), 0.0, alpha=ALPHA)
    assert all(o is s for o, s in zip(out, states))


def test_personalise_matches_dense_step_then_refactor():
    states = make_states([2, 3, 8], [2, 2, 2])
    a = affinity(np.random.default_rng(1).normal(size=(3, 4)))
    eta = 0.3
    targets = laplacian_step([delta_of(s) for s in states], a, eta)
    heads = laplacian_step([s["head::out.weight"] for s in states], a, eta)
    out = personalise_states(states, a, eta, alpha=ALPHA)
    for s, o, target, head in zip(states, out, targets, heads):
        assert list(o) == list(s) and all(o[k].shape == s[k].shape for k in s)
        r = s["lora::layer.0.q::A"].shape[0]
        A, B = refactor(target, r, ALPHA / r)
        assert torch.allclose(delta_of(o), lora_delta(A, B, ALPHA / r), atol=1e-8)
        assert torch.allclose(o["head::out.weight"], head)
    assert torch.allclose(delta_of(out[2]), targets[2], atol=1e-8)  # rank 8 ≥ rank of any target


def test_personalise_eta_one_uniform_equals_cluster_aggregation():
    states = make_states([2, 4, 4], [3, 3, 3], seed=5)
    out = personalise_states(states, np.full((3, 3), 1 / 3), 1.0, alpha=ALPHA)
    agg = aggregate_states(states, [1, 1, 1], alpha=ALPHA, mode="svd")
    for o, m in zip(out, agg):
        assert torch.allclose(delta_of(o), delta_of(m), atol=1e-8)
        assert torch.allclose(o["head::out.weight"], m["head::out.weight"])


def test_personalise_heads_mix_only_within_same_shape():
    states = make_states([2, 2, 2], [2, 3, 2])
    a = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.25, 0.25, 0.5]])
    out = personalise_states(states, a, 1.0, alpha=ALPHA)
    h0, h2 = states[0]["head::out.weight"], states[2]["head::out.weight"]
    # Clients 0 and 2 form the head group; their rows renormalise to (2/3, 1/3) and (1/3, 2/3).
    assert torch.allclose(out[0]["head::out.weight"], 2 / 3 * h0 + 1 / 3 * h2)
    assert torch.allclose(out[2]["head::out.weight"], 1 / 3 * h0 + 2 / 3 * h2)
    assert torch.allclose(out[1]["head::out.weight"], states[1]["head::out.weight"])
