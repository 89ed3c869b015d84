"""Tuning's search spaces: each method's declared ranges, changed by a config file's [search_space], less the
settings the user fixed."""
from __future__ import annotations

import pytest

from atlasfl.errors import AtlasError
from atlasfl.methods.base import Range
from atlasfl.tuning.space import search_space


def test_a_method_searches_its_own_settings_beside_the_shared_ones():
    assert list(search_space("fedprox")) == ["lr", "local_epochs", "prox_mu"]
    assert list(search_space("atlas")) == ["lr", "local_epochs", "eta"]
    assert list(search_space("local_only")) == ["lr", "local_epochs"]
    assert search_space("fedprox")["prox_mu"] == Range(1e-3, 1.0, log=True, why=search_space("fedprox")["prox_mu"].why)


def test_a_fixed_setting_is_not_searched():
    assert list(search_space("atlas", fixed={"lr", "rounds"})) == ["local_epochs", "eta"]


def test_config_file_ranges_narrow_keep_the_scale_widen_and_add():
    space = search_space("fedprox", edits={"lr": [1e-4, 1e-3], "prox-mu": {"low": 0.0, "high": 2.0, "log": False},
                                           "lora_dropout": [0.0, 0.2]})
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-4, 1e-3, True)
    assert (space["prox_mu"].low, space["prox_mu"].high, space["prox_mu"].log) == (0.0, 2.0, False)
    assert (space["lora_dropout"].low, space["lora_dropout"].high, space["lora_dropout"].log) == (0.0, 0.2, False)


@pytest.mark.parametrize(("edits", "message"), [
    ({"tasks": [1, 2]}, "'tasks' is not a numeric setting"),
    ({"no_such": [1, 2]}, "'no_such' is not a numeric setting"),
    ({"lr": [1e-3]}, r"write \[low, high\]"),
    ({"lr": [1e-2, 1e-3]}, "needs low < high"),
    ({"lr": {"low": 0.0, "high": 1.0, "log": True}}, "needs low > 0"),
    ({"local_epochs": [1, 2.5]}, "give integer bounds"),
    ({"lr": ["a", 1]}, "must be numbers"),
])
def test_a_bad_range_is_one_line_naming_it(edits, message):
    with pytest.raises(AtlasError, match=message):
        search_space("fedprox", edits=edits)
