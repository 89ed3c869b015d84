"""The transport-free server: planning (clusters, devices, ranks) and grouping, on synthetic uploads."""
from __future__ import annotations

import numpy as np

from atlasfl.config import build_config
from atlasfl.federation.server import ClientInfo, Server
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
    return Server(cfg, clients, modules=MODULES, shapes=SHAPES, facts=FACTS)


def _uploads(importance_by_task):
    rng = np.random.default_rng(0)
    centres = {"a": rng.normal(size=64), "b": rng.normal(size=64)}
    ups = {}
    for c in range(6):
        task = "a" if c < 3 else "b"
        ups[c] = dict(representation=centres[task] + 0.01 * rng.normal(size=64), representation_noise=1e-4,
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
    assert sum(a.values()) <= 32 * len(MODULES)  # laptop cap 32 × modules
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
    assert plan.fingerprint_bytes[0] == 4 * (64 + 1)
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
