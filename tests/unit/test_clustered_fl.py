"""`ifca` and `cfl`: their rules on hand-computed cases (phases.ifca, phases.cfl) and what the method objects keep."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import Group
from atlasfl.phases.cfl import bipartition, cosine_similarities, flat_update, splits, update_norms
from atlasfl.phases.ifca import farthest_seeds, lowest


def _state(a, b, head):
    return {"lora::m::A": torch.tensor([a]), "lora::m::B": torch.tensor([[b]]), "head::weight": torch.tensor(head)}


def test_ifca_choice_is_the_argmin_first_on_ties():
    assert lowest([0.7, 0.2, 0.2, 0.9]) == 1
    assert lowest([3.0]) == 0


def test_ifca_seeds_are_distinct_and_never_a_duplicate_of_a_chosen_point():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 1.0], [5.0, 1.0]])
    for seed in range(20):  # a duplicate of a chosen row has distance 0, hence probability 0
        first, second = farthest_seeds(points, 2, seed)
        assert {first // 2, second // 2} == {0, 1}
    assert farthest_seeds(points, 2, 3) == farthest_seeds(points, 2, 3)
    with pytest.raises(ValueError):
        farthest_seeds(points, 5, 0)


def test_ifca_averages_inside_each_cluster_and_offers_every_cluster_with_the_clients_head():
    cfg = build_config("tiny-bert", 0, "ifca", tasks=["gen_sentiment", "gen_pair"], clients_per_task=2)
    method = method_for(cfg)
    assert method.clusters_k(cfg) == 2  # the run's number of tasks
    # Three clients: 0 and 2 chose cluster 0, 1 chose cluster 1; client 2's head has 3 labels.
    method.adapters = [{"lora::m::A": torch.zeros(1, 2), "lora::m::B": torch.zeros(1, 1)} for _ in range(2)]
    method.heads = [{2: {"head::weight": torch.full((2, 2), float(j))}, 3: {"head::weight": torch.zeros(3, 2)}}
                    for j in range(2)]
    method.chose({0: 0, 1: 1, 2: 0}, 1)
    assert method.groups([0, 1, 2], None) == [[0, 2], [1]]
    s0 = _state([1.0, 2.0], 4.0, [[1.0, 1.0], [1.0, 1.0]])
    s2 = _state([5.0, 6.0], 8.0, [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]])
    new = method.aggregate([s0, s2], Group([0, 2], [1, 3], np.zeros((2, 1)), cfg, 0.1))
    # Shard-weighted (1 : 3): A = (1·[1, 2] + 3·[5, 6]) / 4 = [4, 5]; B = (4 + 24) / 4 = 7; heads of unequal shape
    # stay their own (each the only one of its label space in the cluster).
    assert torch.equal(method.adapters[0]["lora::m::A"], torch.tensor([[4.0, 5.0]]))
    assert torch.equal(method.adapters[0]["lora::m::B"], torch.tensor([[7.0]]))
    assert torch.equal(new[1]["head::weight"], s2["head::weight"])
    assert torch.equal(method.heads[0][3]["head::weight"], s2["head::weight"])
    assert torch.equal(method.heads[1][2]["head::weight"], torch.ones(2, 2))  # cluster 1 had no upload: kept
    offers = method.offers({0: 2, 2: 3})
    assert [len(offers[c]) for c in (0, 2)] == [2, 2]
    assert torch.equal(offers[2][0]["head::weight"], s2["head::weight"])
    assert torch.equal(offers[0][1]["lora::m::A"], torch.zeros(1, 2))
    saved, tensors = method.clustering_state()
    again = method_for(cfg)
    again.restore_clustering(saved, tensors)
    assert again.choices == method.choices and again.clustering_state()[1].keys() == tensors.keys()
    assert again.offered == method.offered == {0: 1, 1: 1, 2: 1}


def test_ifca_offers_again_to_a_client_that_missed_the_last_offer():
    cfg = build_config("tiny-bert", 0, "ifca", tasks=["gen_sentiment", "gen_pair"], clients_per_task=2)
    method = method_for(cfg)
    assert method.behind({0, 1, 2, 3}, 1) == set()  # no cluster models yet: nothing to offer
    method.adapters = [{"lora::m::A": torch.zeros(1, 2)}] * 2
    method.chose({0: 0, 1: 1}, 3)  # round 3's participants adopted its offer; 2 and 3 were absent
    assert method.behind({0, 1, 2, 3}, 3) == {2, 3}  # before round 3's test
    assert method.behind({0, 2}, 3) == {2}  # before round 4's training: the last offer was round 3's
    method.chose({2: 1}, 3)
    assert method.behind({0, 2}, 3) == set() and method.behind({0, 2}, 4) == {0, 2}


def test_ifca_k_above_the_clients_is_a_one_line_error():
    with pytest.raises(AtlasError, match="--ifca-k 5 exceeds the run's 4 clients") as info:
        build_config("tiny-bert", 0, "ifca", tasks=["gen_sentiment", "gen_pair"], clients_per_task=2, ifca_k=5)
    assert "\n" not in str(info.value)


def test_cfl_norms_and_split_condition():
    updates = [torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.0])]
    assert update_norms(updates) == (1.0, 3.0)  # ‖(3 − 1)/2‖ = 1, max(3, 1) = 3
    kw = dict(size=3, round_idx=3, eps1=1.5, eps2=2.0, warmup=2)
    assert splits(1.0, 3.0, **kw)
    assert not splits(1.6, 3.0, **kw)  # the mean update is not small
    assert not splits(1.0, 1.9, **kw)  # nobody moves enough
    assert not splits(1.0, 3.0, **{**kw, "size": 2})  # two members are never split
    assert not splits(1.0, 3.0, **{**kw, "round_idx": 2})  # still in the warm-up
    start = {"lora::m::A": torch.ones(2), "head::weight": torch.zeros(1)}
    moved = {"lora::m::A": torch.tensor([4.0, 1.0]), "head::weight": torch.ones(1)}
    assert torch.equal(flat_update(moved, start, ["lora::m::A"]), torch.tensor([3.0, 0.0], dtype=torch.float64))


def test_cfl_bipartition_separates_the_two_directions():
    updates = [torch.tensor(u) for u in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0], [0.9, -0.1])]
    similarity = cosine_similarities(updates)
    assert similarity[0, 1] == pytest.approx(0.0) and similarity[0, 0] == pytest.approx(1.0)
    assert bipartition(similarity) == ([0, 2, 4], [1, 3])


def test_cfl_method_splits_a_stationary_cluster_of_opposed_clients_and_keeps_the_split():
    cfg = build_config("tiny-bert", 0, "cfl", tasks=["gen_sentiment", "gen_pair"], clients_per_task=2,
                       cfl_eps1=0.5, cfl_eps2=0.5, cfl_warmup=1)
    method = method_for(cfg)
    start = {c: {"lora::m::A": torch.zeros(2), "head::weight": torch.zeros(1)} for c in range(4)}
    moves = {0: [1.0, 0.1], 1: [-1.0, 0.0], 2: [1.0, -0.1], 3: [-1.0, 0.0]}  # mean (0, 0): stationary
    uploads = {c: {"lora::m::A": torch.tensor(m), "head::weight": torch.ones(1)} for c, m in moves.items()}
    method.regroup(1, [0, 1, 2, 3], uploads, start)  # round 1: the warm-up
    assert method.groups([0, 1, 2, 3], None) == [[0, 1, 2, 3]]
    method.regroup(2, [0, 1, 2, 3], uploads, start)
    assert method.groups([0, 1, 2, 3], None) == [[0, 2], [1, 3]]
    labels, seen = method.round_clusters([0, 1, 2, 3])
    assert labels == [0, 1, 0, 1]
    assert seen["rule_saw"][0]["split"] and seen["rule_saw"][0]["mean_norm"] == pytest.approx(0.0)
    method.regroup(3, [0, 1, 2, 3], uploads, start)  # two members each: never split further
    assert method.groups([0, 1, 2, 3], None) == [[0, 2], [1, 3]]


def test_clustered_methods_are_registered_before_atlas_no_laplacian():
    names = list(METHODS)
    assert names.index("hetlora") < names.index("ifca") < names.index("cfl") < names.index("atlas_no_laplacian")
    assert not METHODS["ifca"].uses_fingerprints and not METHODS["cfl"].uses_fingerprints
