"""fedprox: the proximal term's exact value and gradient, its setting, and what the object tells the driver."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import PARTS


def _fedprox(**kw):
    return method_for(build_config("tiny-bert", 0, "fedprox", **kw))


def test_the_term_is_half_mu_times_the_squared_distance_from_the_round_start():
    params = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    start = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = _fedprox(prox_mu=0.5).extra_loss()(params, start)
    # squared distance 1 + 4 + 4 = 9 (the unsquared norm would be 3): 0.5 / 2 · 9
    assert term.item() == 2.25
    term.backward()
    assert params[0].grad.tolist() == [0.5, 1.0] and params[1].grad.tolist() == [[1.0]]  # mu·(θ − θ_start)


def test_mu_defaults_to_one_hundredth_and_zero_adds_no_term():
    assert build_config("tiny-bert", 0, "fedprox").prox_mu == 0.01
    assert _fedprox(prox_mu=0.0).extra_loss() is None
    with pytest.raises(AtlasError, match="--prox-mu: Input should be greater than or equal to 0"):
        build_config("tiny-bert", 0, "fedprox", prox_mu=-0.1)


def test_fedprox_is_fedavg_over_all_clients_at_one_rank_of_every_part():
    cls = METHODS["fedprox"]
    assert list(METHODS).index("fedprox") == list(METHODS).index("fedavg_cluster") + 1
    assert (cls.heterogeneous_ranks, cls.default_aggregation) == (False, "fedavg")
    assert cls.trains == cls.uploads == cls.downloads == PARTS
    method = _fedprox()
    assert method.groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1, 2, 3]] and not method.uses_fingerprints
    assert _fedprox(sharing="cluster").groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1], [2, 3]]


def test_a_non_default_mu_names_its_own_result_file_and_report_row():
    def name(**kw):
        return build_config("tiny-bert", 0, "fedprox", rounds=3, **kw).run_name

    assert name() == "atlas_tiny-bert_fedprox_seed0_r3"
    assert name(prox_mu=0.1) == "atlas_tiny-bert_fedprox_seed0_r3_mu0.1"
    assert METHODS["fedprox"].variant({"prox_mu": 0.1}) == "mu0.1"
    assert METHODS["fedprox"].variant({"prox_mu": 0.01}) is None
