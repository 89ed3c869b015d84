"""`phases.aggregation.mean_of_parts`: the shard-weighted mean of states that hold only some parts."""
from __future__ import annotations

import pytest
import torch

from atlasfl.phases.aggregation import mean_of_parts

B = "lora::l.0.q::B"


def _state(b: float, head: float, labels: int = 2) -> dict[str, torch.Tensor]:
    return {B: torch.full((3, 2), b), "head::weight": torch.full((labels, 3), head), "head::bias": torch.zeros(labels)}


def test_every_factor_is_the_weighted_mean_and_heads_mix_only_among_same_shape_heads():
    states = [_state(8.0, 4.0), _state(0.0, 8.0), _state(4.0, 9.0, labels=3)]
    out = mean_of_parts(states, [1, 3, 4])
    for new in out:  # B: (1·8 + 3·0 + 4·4) / 8
        assert torch.equal(new[B], torch.full((3, 2), 3.0)) and list(new) == list(states[0])
    # the two binary heads: (1·4 + 3·8) / 4; the three-label head has no partner and is its own
    assert torch.equal(out[0]["head::weight"], torch.full((2, 3), 7.0))
    assert torch.equal(out[1]["head::weight"], out[0]["head::weight"])
    assert torch.equal(out[2]["head::weight"], torch.full((3, 3), 9.0))
    out[0][B].add_(1.0)
    assert torch.equal(out[1][B], torch.full((3, 2), 3.0)) and states[0][B][0, 0] == 8.0  # fresh tensors


def test_an_a_factor_alone_is_averaged_as_well():
    a = "lora::l.0.q::A"
    out = mean_of_parts([{a: torch.tensor([[1.0, 2.0]])}, {a: torch.tensor([[3.0, 6.0]])}], [1, 1])
    assert [s[a].tolist() for s in out] == [[[2.0, 4.0]], [[2.0, 4.0]]]


def test_factors_of_different_ranks_or_different_keys_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        mean_of_parts([{B: torch.zeros(3, 2)}, {B: torch.zeros(3, 4)}], [1, 1])
    with pytest.raises(ValueError, match="same keys"):
        mean_of_parts([{B: torch.zeros(3, 2)}, {"lora::l.1.q::B": torch.zeros(3, 2)}], [1, 1])
    with pytest.raises(ValueError, match="not a trainable-state key"):
        mean_of_parts([{"x": torch.zeros(1)}, {"x": torch.zeros(1)}], [1, 1])
