"""fedrep: its two phases, what travels, its settings, and the one-phase default of every other method."""
from __future__ import annotations

import pytest

from atlasfl.config import build_config
from atlasfl.errors import AtlasError
from atlasfl.federation.training import phase_plan, round_loss
from atlasfl.methods import METHODS, method_for


def _cfg(method="fedrep", **kw):
    return build_config("tiny-bert", 0, method, **kw)


def test_fedrep_trains_the_head_then_the_adapter_and_sends_the_adapter_alone():
    cls = METHODS["fedrep"]
    names = list(METHODS)
    assert names.index("hetlora") < names.index("fedrep") < names.index("atlas_no_laplacian")
    assert cls.uploads == cls.downloads == ("lora_A", "lora_B") and "head" not in cls.uploads
    method = method_for(_cfg())
    assert (method.cfg.fedrep_head_epochs, method.cfg.fedrep_body_epochs) == (5, 1)  # the Flower baseline's
    assert method.local_phases() == ((("head",), 5), (("lora_A", "lora_B"), 1))
    # Phase 2 continues phase 1's batch stream: its first epoch is epoch 5 of the round.
    assert phase_plan(method) == [(("head",), 5, 0), (("lora_A", "lora_B"), 1, 5)]
    assert phase_plan(method_for(_cfg(fedrep_head_epochs=0))) == [(("lora_A", "lora_B"), 1, 0)]
    assert method.groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1, 2, 3]] and not method.uses_fingerprints
    assert method_for(_cfg(sharing="cluster")).groups([0, 1, 2, 3], [0, 0, 1, 1]) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("name", [n for n in METHODS if n != "fedrep"])
def test_every_other_method_trains_one_phase_of_its_parts_for_the_local_epochs(name):
    method = method_for(_cfg(name, local_epochs=3))
    assert method.local_phases() == ((method.trains, 3),)
    assert phase_plan(method) == [(method.trains, 3, 0)]


def test_the_round_loss_weights_each_phase_by_its_epochs_and_one_phase_is_its_own_mean():
    assert round_loss([0.1], [3]) == 0.1
    assert round_loss([1.0, 4.0], [2, 1]) == 2.0  # (2·1 + 1·4) / 3


def test_fedrep_refuses_no_epochs_and_svd_in_one_line_and_names_its_variants():
    for kw, words in ((dict(fedrep_head_epochs=0, fedrep_body_epochs=0), "fedrep trains nothing"),
                      (dict(aggregation="svd"), "keeps every head local"),
                      (dict(fedrep_head_epochs=-1), "--fedrep-head-epochs: Input should be greater than or equal")):
        with pytest.raises(AtlasError, match=words) as info:
            _cfg(**kw)
        assert "\n" not in str(info.value)
    assert _cfg(rounds=3).run_name == "atlas_tiny-bert_fedrep_seed0_r3"
    assert _cfg(rounds=3, fedrep_head_epochs=2).run_name == "atlas_tiny-bert_fedrep_seed0_r3_h2b1"
    assert METHODS["fedrep"].variant({"fedrep_head_epochs": 2, "fedrep_body_epochs": 1}) == "τ_h 2, τ_b 1"
    assert METHODS["fedrep"].variant({"sharing": "cluster"}) == "in clusters"
