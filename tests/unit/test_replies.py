"""Reply checks (`federation.replies`): what is rejected and why, on constructed states; the planned spec is the
real client state's."""
from __future__ import annotations

import pytest
import torch

from atlasfl.federation.replies import check_replies, reply_fault, state_norm, upload_spec
from atlasfl.methods.base import PARTS, select

SPEC = {"lora::m::A": (2, 3), "lora::m::B": (4, 2), "head::weight": (2, 5), "head::bias": (2,)}


def state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {key: torch.full(shape, scale) for key, shape in SPEC.items()}


def test_a_sound_reply_passes_and_each_fault_is_named():
    assert reply_fault(state(), SPEC) is None
    extra = {**state(), "lora::m::R": torch.zeros(4, 3)}
    assert "unexpected ['lora::m::R']" in reply_fault(extra, SPEC)
    absent = {k: v for k, v in state().items() if k != "head::bias"}
    assert "absent ['head::bias']" in reply_fault(absent, SPEC)
    assert "shape (3, 3), the plan says (2, 3)" in reply_fault({**state(), "lora::m::A": torch.zeros(3, 3)}, SPEC)
    assert "dtype torch.float64" in reply_fault({**state(), "head::bias": torch.zeros(2, dtype=torch.float64)}, SPEC)
    for bad in (float("nan"), float("inf"), -float("inf")):
        nan = state()
        nan["lora::m::B"][1, 0] = bad
        assert "not finite" in reply_fault(nan, SPEC)


def test_the_norm_bound_is_against_the_groups_lower_median_of_sound_replies():
    norm = state_norm(state())
    assert norm == pytest.approx((6 + 8 + 10 + 2) ** 0.5)
    uploads = {0: state(), 1: state(1.5), 2: state(1000.0), 3: state(2.0), 4: state(float("nan"))}
    good, rejected = check_replies(uploads, dict.fromkeys(uploads, SPEC), [[0, 1, 2, 4], [3]], norm_bound=100)
    assert set(rejected) == {2, 4} and "not finite" in rejected[4]
    # The group's sound replies are 0, 1, 2 (NaN left out first): median 1.5 x norm; 1000 / 1.5 > 100.
    assert f"median {1.5 * norm:.4g}" in rejected[2] and "--reply-norm-bound 100" in rejected[2]
    assert good == {0: uploads[0], 1: uploads[1], 3: uploads[3]} and good[0] is uploads[0]  # untouched objects
    pair = {0: state(), 1: state(101.0)}  # a group of two: the larger reply against the smaller
    assert set(check_replies(pair, dict.fromkeys(pair, SPEC), [[0, 1]], norm_bound=100)[1]) == {1}
    assert check_replies(pair, dict.fromkeys(pair, SPEC), [[0, 1]], norm_bound=102)[1] == {}
    for off in (None, 0):
        assert check_replies(pair, dict.fromkeys(pair, SPEC), [[0, 1]], norm_bound=off) == (pair, {})


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_the_planned_spec_is_the_real_clients_state(model):
    from atlasfl.models.lora import FederatedLoRAModel, head_has_bias
    from atlasfl.models.registry import load_backbone

    fm = FederatedLoRAModel(load_backbone(model, init="random"), alpha=16.0, dropout=0.0, seed=0)
    ranks = {m: 2 + 2 * i for i, m in enumerate(fm.modules)}
    fm.add_client(0, ranks, 3)
    real = fm.get_state(0)
    facts = fm.facts()
    for parts in (PARTS, ("lora_A",), ("lora_B", "head")):
        spec = upload_spec(ranks, fm.module_shapes(), 3, facts.hidden_size, head_bias=head_has_bias(facts.family),
                           parts=parts)
        assert spec == {k: tuple(v.shape) for k, v in select(real, parts).items()}
