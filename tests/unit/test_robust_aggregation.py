"""Robust aggregation (`--robust-aggregation`): the coordinate-wise median and trimmed mean on constructed tensors,
their use in place of the mean for every key and head group, and the refusals."""
from __future__ import annotations

import pytest
import torch

from atlasfl.errors import AtlasError
from atlasfl.phases.aggregation import coordinate_median, mean_of_parts, robust_rule, trimmed_mean


def column(*values):
    return [torch.tensor([v, -v]) for v in values]


def test_the_median_of_an_odd_and_an_even_count():
    assert torch.equal(coordinate_median(column(3.0, 1.0, 1e9)), torch.tensor([3.0, -3.0]))
    assert torch.equal(coordinate_median(column(4.0, 1.0, 2.0, 1e9)), torch.tensor([3.0, -3.0]))  # (2 + 4) / 2
    mixed = [torch.tensor([1.0, 9.0]), torch.tensor([5.0, 0.0]), torch.tensor([2.0, 4.0])]
    assert torch.equal(coordinate_median(mixed), torch.tensor([2.0, 4.0]))  # per coordinate, not per client


def test_the_trimmed_mean_cuts_floor_fraction_n_off_each_end():
    values = column(10.0, 1.0, 2.0, 3.0, -1e9)  # n = 5
    assert torch.equal(trimmed_mean(values, 0.2), torch.tensor([2.0, -2.0]))  # cut 1 each end: mean(1, 2, 3)
    assert torch.equal(trimmed_mean(values, 0.19), torch.stack(values).mean(0))  # floor(0.95) = 0: the plain mean
    assert torch.equal(trimmed_mean(values, 0.4), torch.tensor([2.0, -2.0]))  # cut 2 each end: the median
    assert torch.equal(trimmed_mean(column(1.0, 2.0, 3.0, 4.0, 100.0, -100.0), 0.34), torch.tensor([2.5, -2.5]))


def test_a_robust_rule_replaces_the_weighted_mean_of_every_key_and_head_group():
    states = [{"lora::m::A": torch.full((2, 3), float(v)), "head::weight": torch.full((k, 4), float(v))}
              for v, k in ((1, 2), (2, 2), (100, 2), (5, 3))]
    out = mean_of_parts(states, [1, 1, 1, 1000], combine=robust_rule("median", 0.2))
    assert all(torch.equal(s["lora::m::A"], torch.full((2, 3), 3.5)) for s in out)  # (2 + 5) / 2; sizes ignored
    assert [float(s["head::weight"][0, 0]) for s in out] == [2.0, 2.0, 2.0, 5.0]  # heads mix by shape only
    weighted = mean_of_parts(states, [1, 1, 1, 1000])
    assert float(weighted[0]["lora::m::A"][0, 0]) == pytest.approx((1 + 2 + 100 + 5000) / 1003)
    with pytest.raises(AtlasError, match="unknown robust aggregation 'mode'"):
        robust_rule("mode", 0.2)
    assert robust_rule(None, 0.2) is None


@pytest.mark.parametrize("method, extra, why", [
    ("atlas", {}, "ranks differ"), ("flora", {}, "ranks differ"),
    ("fedavg_cluster", {"aggregation": "svd"}, "--aggregation svd refactors the mean"),
])
def test_methods_whose_factors_do_not_line_up_refuse(make_config, method, extra, why):
    with pytest.raises(AtlasError, match=f"{method} cannot take --robust-aggregation median: .*{why}"):
        make_config(method=method, robust_aggregation="median", **extra)


@pytest.mark.parametrize("method", ["standard_fl", "fedavg_cluster", "fedprox", "ffa_lora", "fedsa_lora"])
def test_the_sharing_methods_at_one_rank_take_it(make_config, method):
    assert make_config(method=method, robust_aggregation="trimmed_mean").trim_fraction == 0.2
