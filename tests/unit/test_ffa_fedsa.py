"""ffa_lora and fedsa_lora as objects: what they train and send, where they sit in the registry, and their rule
on hand-made uploads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import Group

A, B = "lora::l.0.q::A", "lora::l.0.q::B"


def _group(method, sizes):
    cfg = build_config("tiny-bert", 0, method)
    return method_for(cfg), Group(clients=list(range(len(sizes))), sizes=sizes,
                                  fingerprints=np.zeros((len(sizes), 2)), cfg=cfg, eta=cfg.eta)


def test_ffa_lora_trains_and_sends_b_and_heads_only_over_all_clients_at_one_rank():
    cls = METHODS["ffa_lora"]
    assert list(METHODS).index("fedavg_cluster") < list(METHODS).index("ffa_lora") < list(METHODS).index("atlas")
    assert cls.trains == cls.uploads == cls.downloads == ("lora_B", "head")
    assert (cls.heterogeneous_ranks, cls.default_aggregation) == (False, "fedavg")
    assert method_for(build_config("tiny-bert", 0, "ffa_lora")).groups([0, 1, 2], [0, 0, 1]) == [[0, 1, 2]]
    assert build_config("tiny-bert", 0, "ffa_lora", aggregation="fedavg").aggregation == "fedavg"


def test_ffa_lora_gives_every_client_the_shard_weighted_mean_of_b_and_head():
    method, group = _group("ffa_lora", [1, 3])
    uploads = [{B: torch.full((3, 2), 4.0), "head::weight": torch.full((2, 3), 0.0)},
               {B: torch.full((3, 2), 8.0), "head::weight": torch.full((2, 3), 4.0)}]
    for new in method.aggregate(uploads, group):  # (1·4 + 3·8) / 4 and (1·0 + 3·4) / 4
        assert torch.equal(new[B], torch.full((3, 2), 7.0))
        assert torch.equal(new["head::weight"], torch.full((2, 3), 3.0))


def test_fedsa_lora_trains_everything_and_sends_only_a_over_all_clients_at_one_rank():
    cls = METHODS["fedsa_lora"]
    assert cls.trains == ("lora_A", "lora_B", "head") and cls.uploads == cls.downloads == ("lora_A",)
    assert (cls.heterogeneous_ranks, cls.default_aggregation) == (False, "fedavg")
    assert method_for(build_config("tiny-bert", 0, "fedsa_lora")).groups([0, 1, 2], [0, 0, 1]) == [[0, 1, 2]]


def test_fedsa_lora_gives_every_client_the_shard_weighted_mean_of_a():
    method, group = _group("fedsa_lora", [3, 1])
    uploads = [{A: torch.tensor([[4.0, 0.0]])}, {A: torch.tensor([[8.0, 4.0]])}]
    assert [new[A].tolist() for new in method.aggregate(uploads, group)] == [[[5.0, 1.0]]] * 2  # (3·u0 + u1) / 4


def test_the_svd_aggregation_is_refused_where_only_one_factor_is_averaged():
    with pytest.raises(AtlasError, match="fedsa_lora averages A alone"):
        build_config("tiny-bert", 0, "fedsa_lora", aggregation="svd")
