"""ditto: its pull's exact value and gradient, its setting, and what it tells the driver."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS, method_for
from atlasfl.methods.base import PARTS, part_of, select


def _ditto(**kw):
    return method_for(build_config("tiny-bert", 0, "ditto", **kw))


def test_the_pull_is_half_lambda_times_the_squared_distance_from_the_global_state():
    v = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    w = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = _ditto(ditto_lambda=2.0).personal_loss()(v, w)
    assert term.item() == 9.0  # 2 / 2 · (1 + 4 + 4)
    term.backward()
    assert v[0].grad.tolist() == [2.0, 4.0] and v[1].grad.tolist() == [[4.0]]  # λ(v − w)


def test_lambda_defaults_to_one_tenth_zero_adds_no_term_and_a_negative_one_is_a_one_line_error():
    assert _ditto().cfg.ditto_lambda == 0.1
    assert _ditto(ditto_lambda=0.0).personal_loss() is None
    with pytest.raises(AtlasError, match="--ditto-lambda: Input should be greater than or equal to 0") as info:
        build_config("tiny-bert", 0, "ditto", ditto_lambda=-1.0)
    assert "\n" not in str(info.value)


def test_ditto_is_fedavg_of_every_part_with_a_personal_copy_that_never_travels():
    cls = METHODS["ditto"]
    names = list(METHODS)
    assert names.index("fedrep") < names.index("ditto") < names.index("atlas_no_laplacian")
    assert cls.keeps_personal and not METHODS["standard_fl"].keeps_personal
    assert cls.trains == cls.uploads == cls.downloads == PARTS and "personal" not in PARTS
    method = _ditto()
    assert method.extra_loss() is None and method.local_phases() == ((PARTS, method.cfg.local_epochs),)
    assert method.groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1, 2, 3]] and not method.uses_fingerprints
    state = {"lora::m::A": 1, "head::weight": 2, "personal::lora::m::A": 3, "personal::head::weight": 4}
    assert [part_of(k) for k in state] == ["lora_A", "head", "personal", "personal"]
    assert select(state, PARTS) == {"lora::m::A": 1, "head::weight": 2}


def test_a_non_default_lambda_names_its_own_result_file_and_report_row():
    assert build_config("tiny-bert", 0, "ditto", rounds=3).run_name == "atlas_tiny-bert_ditto_seed0_r3"
    assert build_config("tiny-bert", 0, "ditto", rounds=3, ditto_lambda=1.0).run_name == \
        "atlas_tiny-bert_ditto_seed0_r3_lam1"
    assert METHODS["ditto"].variant({"ditto_lambda": 1.0}) == "λ1"
    assert METHODS["ditto"].variant({"sharing": "cluster"}) == "in clusters"
