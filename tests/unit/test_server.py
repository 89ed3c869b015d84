"""The transport-free server: planning (clusters, devices, ranks) and grouping, on synthetic uploads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.config import build_config
from atlasfl.federation.server import ClientInfo, Plan, Server
from atlasfl.methods import method_for
from atlasfl.phases.devices import ModelFacts
from atlasfl.phases.ranks import adapter_params

MODULES = [f"layers.{i}.attn.{p}" for i in range(4) for p in ("q", "v")]
SHAPES = {m: (64, 64) for m in MODULES}
FACTS = ModelFacts(total_params=1_000_000, hidden_size=64, num_layers=4, intermediate_size=256, num_heads=4,
                   vocab_size=1000, family="bert", dtype_bytes=4)


def _server(method, devices, **kw):
    cfg = build_config("tiny-bert", 0, method, tasks=("generated",), devices=devices,
                       rank_candidates=(2, 4, 8, 16, 32, 64), **kw)
    clients = [ClientInfo(c, "a" if c < 3 else "b", 100, 2) for c in range(6)]
    return Server(cfg, method_for(cfg), clients, modules=MODULES, shapes=SHAPES, facts=FACTS)


def _uploads(importance_by_task):
    rng = np.random.default_rng(0)
    centres = {"a": rng.normal(size=64), "b": rng.normal(size=64)}
    ups = {}
    for c in range(6):
        task = "a" if c < 3 else "b"
        label_means = centres[task] + 0.01 * rng.normal(size=(2, 64))  # two labels, 50 examples each
        ups[c] = dict(representation=label_means.mean(0), representation_noise=1e-4,
                      representation_count=99.0, representation_dims=20.0,
                      label_means=label_means, label_counts=np.array([50.0, 50.0]),
                      gradient=rng.normal(size=64), importance=importance_by_task[task])
    return ups


def test_plan_clusters_by_fingerprint_and_allocates_by_cluster_importance():
    early = {m: (10.0 if m.startswith("layers.0") else 1.0) for m in MODULES}
    late = {m: (10.0 if m.startswith("layers.3") else 1.0) for m in MODULES}
    server = _server("atlas", ("laptop_8gb",))
    plan = server.plan(_uploads({"a": early, "b": late}))
    assert plan.cluster_labels == [0, 0, 0, 1, 1, 1] and plan.phase1["ari"] == 1.0
    a, b = plan.ranks[0], plan.ranks[3]
    assert a["layers.0.attn.q"] > a["layers.3.attn.q"]  # important layers get larger ranks...
    assert b["layers.3.attn.q"] > b["layers.0.attn.q"]  # ...and importance decides which
    assert sum(a.values()) <= 32 * len(MODULES)  # laptop: mean rank cap 32 × modules...
    assert max(a.values()) > 32  # ...a cap on the mean, not on each module: important layers go above it
    info = plan.phase2["clients"]["0"]
    assert (info["mean_rank_cap"], info["max_module_rank"], info["rank_budget"]) == (32, 64, 32 * len(MODULES))
    assert server.groups() == [[0, 1, 2], [3, 4, 5]]


def test_smaller_device_never_gets_more_adapter_memory():
    imp = {m: float(i + 1) for i, m in enumerate(MODULES)}
    sizes = []
    for device in ("cpu_2gb", "tablet_4gb", "laptop_8gb", "gpu_16gb"):
        plan = _server("atlas", (device,)).plan(_uploads({"a": imp, "b": imp}))
        sizes.append(adapter_params(plan.ranks[0], SHAPES))
        assert plan.phase2["clients"]["0"]["device"] == device
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_homogeneous_methods_use_the_median_rank_and_count_no_importance_traffic():
    imp = {m: float(i + 1) for i, m in enumerate(MODULES)}
    plan = _server("fedavg_cluster", None).plan(_uploads({"a": imp, "b": imp}))
    assert all(set(r.values()) == {8} for r in plan.ranks.values())  # lower middle of 2..64
    assert plan.fingerprint_bytes[0] == 4 * (64 + 3 + 2 * 65)  # sketch; σ², n, dimensions; 2 labels' means, counts
    local = _server("local_only", None).plan(_uploads({"a": imp, "b": imp}))
    assert local.fingerprint_bytes[0] == 0 and _server("local_only", None).groups() == []


def test_infeasible_client_is_flagged():
    big = ModelFacts(total_params=1_500_000_000, hidden_size=1600, num_layers=48, intermediate_size=6400,
                     num_heads=25, vocab_size=50257, family="gpt2", dtype_bytes=4)
    server = _server("atlas", ("cpu_2gb",))
    server.facts = big
    imp = {m: 1.0 for m in MODULES}
    plan = server.plan(_uploads({"a": imp, "b": imp}))
    assert plan.phase2["clients"]["0"]["feasible"] is False
    assert all(r == 2 for r in plan.ranks[0].values())  # no memory left: the smallest candidate


# ---- phases 3 and 4 at the server, on hand-made uploads ------------------------------------------
ALPHA = 16.0
D = 64  # every module is D×D (SHAPES)


def _adopt(server: Server, labels: list[int], fingerprints: np.ndarray, ranks: dict | None = None) -> Server:
    """Give the server a grouping without phase 1 (clustering is tested elsewhere), and the clients' `ranks` where
    the case needs their shapes (an absent member's stand-in)."""
    server.adopt(Plan(cluster_labels=labels, cluster_source="oracle", ranks=ranks or {}, devices=[],
                      phase1=dict(fingerprints=fingerprints.tolist()), phase2={}))
    return server


def _hetero_ranks(cid: int) -> dict[str, int]:
    """Two different ranks inside every client, and different maps across clients."""
    return {m: (2, 4, 8)[(i + cid) % 3] for i, m in enumerate(MODULES)}


def _state(cid: int, ranks: dict[str, int], basis=None) -> dict[str, torch.Tensor]:
    """A client's trainable state. With `basis` = (U, V) every ΔW lies in one shared rank-2 subspace."""
    g = torch.Generator().manual_seed(100 + cid)
    state = {}
    for m, r in ranks.items():
        if basis is None:
            A, B = torch.randn(r, D, generator=g), torch.randn(D, r, generator=g)
        else:
            U, V = basis
            A = torch.randn(r, 2, generator=g, dtype=torch.float64) @ V.T
            B = U @ torch.randn(2, r, generator=g, dtype=torch.float64)
            A, B = A.float(), B.float()
        state[f"lora::{m}::A"], state[f"lora::{m}::B"] = A, B
    state["head::weight"], state["head::bias"] = torch.randn(2, D, generator=g), torch.randn(2, generator=g)
    return state


def _delta(state, m):
    A, B = state[f"lora::{m}::A"].double(), state[f"lora::{m}::B"].double()
    return ALPHA / A.shape[0] * B @ A


def _truncate(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def _by_hand_affinity(F: np.ndarray) -> np.ndarray:
    """a_kl = exp(−‖f_k − f_l‖²/σ), a_kk = 1, rows normalised; σ = the median off-diagonal squared distance."""
    sq = ((F[:, None, :] - F[None, :, :]) ** 2).sum(-1)
    sigma = np.median(sq[~np.eye(len(F), dtype=bool)])
    a = np.exp(-sq / sigma)
    return a / a.sum(1, keepdims=True)


def test_laplacian_step_at_heterogeneous_ranks_is_the_truncated_formula():
    """Each returned ΔW_k is the rank-r_k truncation of ΔW_k − η Σ_l a_kl (ΔW_k − ΔW_l), computed by hand;
    the lone client of its cluster gets nothing back."""
    # Centred unit fingerprints (the server's space is the same): cluster {0, 1, 2} is not equidistant.
    s = 1 / np.sqrt(2)
    F = np.array([[1, 0, 0], [0, 1, 0], [s, s, 0], [-1, 0, 0], [0, -1, 0], [-s, -s, 0]], dtype=np.float64)
    eta = 0.3
    server = _adopt(_server("atlas", None, eta=eta), [0, 0, 0, 1, 1, 2], F)
    assert server.sharing_groups() == [[0, 1, 2], [3, 4]] and server.sharing_clients() == [0, 1, 2, 3, 4]
    ranks = {c: _hetero_ranks(c) for c in range(6)}
    uploads = {c: _state(c, ranks[c]) for c in range(6)}
    out = server.aggregate(uploads)
    assert sorted(out) == [0, 1, 2, 3, 4]  # client 5 is alone in its cluster: untouched, nothing sent back
    for group in ([0, 1, 2], [3, 4]):
        a = _by_hand_affinity(F[group])
        for i, k in enumerate(group):
            for m in MODULES:
                target = _delta(uploads[k], m) - eta * sum(
                    a[i, j] * (_delta(uploads[k], m) - _delta(uploads[n], m)) for j, n in enumerate(group))
                got = out[k]
                assert got[f"lora::{m}::A"].shape == (ranks[k][m], D) and got[f"lora::{m}::B"].shape == (D, ranks[k][m])
                expected = _truncate(target, ranks[k][m])
                assert torch.allclose(_delta(got, m), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
                assert not torch.allclose(_delta(got, m), _delta(uploads[k], m), atol=1e-2)  # it moved
            head = uploads[k]["head::weight"].double() - eta * sum(
                a[i, j] * (uploads[k]["head::weight"].double() - uploads[n]["head::weight"].double())
                for j, n in enumerate(group))
            assert torch.allclose(out[k]["head::weight"].double(), head, atol=1e-6)


def test_laplacian_step_brings_cluster_mates_closer_by_the_predicted_factor():
    """Equidistant fingerprints and ΔWs in one rank-2 subspace (so truncation at ranks 2/4/8 loses nothing).

    Unit fingerprints e_1, e_2, e_3 are √2 apart; σ (median squared distance) is 2, so before normalising
    a_kk = 1 and a_kl = e⁻¹, and after it every mate weighs b = e⁻¹/(1 + 2e⁻¹). Then
    ΔW'_k − ΔW'_l = (1 − 3ηb)(ΔW_k − ΔW_l): every pairwise distance shrinks by 1 − 3ηb, whatever the ranks."""
    F = np.vstack([np.eye(3), -np.eye(3)])
    b = np.exp(-1) / (1 + 2 * np.exp(-1))
    g = torch.Generator().manual_seed(7)
    basis = tuple(torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))[0] for _ in range(2))
    ranks = {c: _hetero_ranks(c) for c in range(6)}
    uploads = {c: _state(c, ranks[c], basis) for c in range(6)}
    for eta in (0.1, 0.5, 1.0):
        out = _adopt(_server("atlas", None, eta=eta), [0, 0, 0, 1, 1, 1], F).aggregate(uploads)
        factor = 1 - 3 * eta * b
        for group in ([0, 1, 2], [3, 4, 5]):
            for m in MODULES:
                before = {k: _delta(uploads[k], m) for k in group}
                after = {k: _delta(out[k], m) for k in group}
                for k in group:
                    step = before[k] - eta * b * sum(before[k] - before[n] for n in group)
                    assert torch.allclose(after[k], step, atol=1e-4)
                    for n in group:
                        if k < n:
                            d0 = torch.linalg.norm(before[k] - before[n]).item()
                            d1 = torch.linalg.norm(after[k] - after[n]).item()
                            assert d1 == pytest.approx(factor * d0, rel=1e-4) and d1 < d0


def test_nothing_is_shared_at_eta_zero_or_in_a_singleton_group():
    F = np.vstack([np.eye(3), -np.eye(3)])
    uploads = {c: _state(c, _hetero_ranks(c)) for c in range(6)}
    at_zero = _adopt(_server("atlas", None, eta=0.0), [0, 0, 0, 1, 1, 1], F)
    assert at_zero.sharing_clients() == [] and at_zero.aggregate({}) == {}
    mean = _adopt(_server("atlas_no_laplacian", None), [0, 0, 0, 1, 1, 2], F)
    assert mean.sharing_groups() == [[0, 1, 2], [3, 4]]
    out = mean.aggregate({c: uploads[c] for c in mean.sharing_clients()})
    assert sorted(out) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no upload"):
        mean.aggregate({c: uploads[c] for c in (0, 1, 2)})
    assert _adopt(_server("local_only", None), [0, 0, 0, 1, 1, 1], F).sharing_clients() == []
    assert _adopt(_server("standard_fl", None), [0, 1, 2, 3, 4, 5], F).sharing_groups() == [list(range(6))]
