import numpy as np
import pytest

from atlasfl.phases.ranks import adapter_params, allocate_ranks, rank_budget_for_memory

MODULES = ["l0.q", "l0.v", "l1.q", "l1.v", "l2.q", "l2.v"]
CANDIDATES = (4, 8, 16, 32)
SHAPES = {m: (768, 768) if m.endswith("q") else (2304, 768) for m in MODULES}


def test_uniform_importance_gives_cap_everywhere():
    for cap in (8, 16, 32):
        ranks = allocate_ranks(MODULES, {m: 1.0 for m in MODULES}, cap=cap, candidates=CANDIDATES)
        assert ranks == {m: cap for m in MODULES}
    assert allocate_ranks(MODULES, {}, cap=16, candidates=CANDIDATES) == {m: 16 for m in MODULES}
    assert allocate_ranks(MODULES, {m: None for m in MODULES}, cap=8, candidates=CANDIDATES) == {m: 8 for m in MODULES}


def test_importance_decides_which_modules_get_larger_ranks():
    modules = ["q", "k", "v", "o"]
    ranks = allocate_ranks(modules, {"q": 4, "k": 2, "v": 1, "o": 1}, cap=16, candidates=CANDIDATES, total_budget=40)
    assert ranks == {"q": 16, "k": 16, "v": 4, "o": 4}
    swapped = allocate_ranks(modules, {"q": 1, "k": 1, "v": 4, "o": 2}, cap=16, candidates=CANDIDATES, total_budget=40)
    assert swapped == {"q": 4, "k": 4, "v": 16, "o": 16}
    # Nearest-candidate rounding of the proportional share when nothing is left over (24 = 16 + 4 + 4).
    ranks = allocate_ranks(["a", "b", "c"], {"a": 3, "b": 1, "c": 1}, cap=16, candidates=CANDIDATES, total_budget=24)
    assert ranks == {"a": 16, "b": 4, "c": 4}


def test_ranks_are_candidates_within_cap_and_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cap = int(rng.choice([8, 16, 32, 64]))
        importance = {m: float(v) for m, v in zip(MODULES, rng.exponential(size=len(MODULES)))}
        budget = int(rng.integers(24, cap * len(MODULES) + 1))
        ranks = allocate_ranks(MODULES, importance, cap=cap, candidates=CANDIDATES, total_budget=budget)
        assert set(ranks) == set(MODULES)
        assert all(r in CANDIDATES and r <= cap for r in ranks.values())
        assert sum(ranks.values()) <= budget


def test_tighter_budget_never_gives_more():
    rng = np.random.default_rng(1)
    for _ in range(50):
        importance = {m: float(v) for m, v in zip(MODULES, rng.exponential(size=len(MODULES)))}
        previous = None
        for budget in range(24, 32 * len(MODULES) + 1):
            ranks = allocate_ranks(MODULES, importance, cap=32, candidates=CANDIDATES, total_budget=budget)
            if previous is not None:
                assert all(ranks[m] >= previous[m] for m in MODULES)
                assert adapter_params(ranks, SHAPES) >= adapter_params(previous, SHAPES)
            previous = ranks


def test_minimum_is_the_smallest_candidate():
    ranks = allocate_ranks(["a", "b"], {"a": 1.0, "b": 0.0}, cap=2, candidates=CANDIDATES, total_budget=1)
    assert ranks == {"a": 4, "b": 4}  # no candidate ≤ cap and a budget too small: smallest candidate


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        allocate_ranks(["a"], {"a": -1.0}, cap=8, candidates=CANDIDATES)
    with pytest.raises(ValueError):
        allocate_ranks(["a"], {}, cap=8, candidates=(0, 4))
    with pytest.raises(ValueError):
        adapter_params({"a": 4}, {})


def test_adapter_params_and_memory_budget():
    assert adapter_params({"a": 4, "b": 8}, {"a": (10, 20), "b": (5, 5)}) == 4 * 30 + 8 * 10
    shapes = {"a": (10, 20), "b": (5, 5)}
    budget = rank_budget_for_memory(30 * 16 * 12, shapes)  # 16 bytes per fp32 param with AdamW
    assert budget == 12
    assert adapter_params({"a": 6, "b": 6}, shapes) * 16 <= 30 * 16 * 12
    assert rank_budget_for_memory(0, shapes) == 0


def test_server_mode_the_device_caps_the_mean_rank_not_each_module():
    """As `Server._allocate` calls it: per-module cap = the largest candidate, budget = mean cap × modules."""
    cands = (4, 8, 16, 32, 64)
    importance = dict(zip(MODULES, (8.0, 4.0, 1.0, 1.0, 1.0, 1.0)))
    mean_cap = 16
    ranks = allocate_ranks(MODULES, importance, cap=max(cands), candidates=cands, total_budget=mean_cap * len(MODULES))
    # Shares 1/2, 1/4 and 1/16 of 96 are 48, 24 and 6: rounded to candidates within the budget.
    assert ranks == {"l0.q": 64, "l0.v": 16, "l1.q": 4, "l1.v": 4, "l2.q": 4, "l2.v": 4}
    assert max(ranks.values()) > mean_cap >= sum(ranks.values()) / len(MODULES)  # one module above the mean cap
    # Were the cap a per-module maximum, that budget would give every module the cap: importance would not count.
    as_maximum = allocate_ranks(MODULES, importance, cap=mean_cap, candidates=cands,
                                total_budget=mean_cap * len(MODULES))
    assert set(as_maximum.values()) == {mean_cap}


def test_server_mode_properties_hold_for_random_importances():
    rng = np.random.default_rng(2)
    cands = (4, 8, 16, 32, 64)
    for _ in range(200):
        mean_cap = int(rng.choice([8, 16, 32, 64]))
        importance = {m: float(v) for m, v in zip(MODULES, rng.exponential(size=len(MODULES)))}
        ranks = allocate_ranks(MODULES, importance, cap=max(cands), candidates=cands,
                               total_budget=mean_cap * len(MODULES))
        assert all(r in cands for r in ranks.values())
        assert sum(ranks.values()) <= mean_cap * len(MODULES)
        order = sorted(MODULES, key=importance.get)
        assert [ranks[m] for m in order] == sorted(ranks[m] for m in order)  # more important, never smaller
