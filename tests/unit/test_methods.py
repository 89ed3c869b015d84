"""The method objects: what each of the five says to the driver, and how their settings join the run config."""
from __future__ import annotations

import pytest
import torch

from atlasfl.config import METHODS, RunConfig, build_config
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS as METHOD_CLASSES
from atlasfl.methods import method_for
from atlasfl.methods.atlas import Atlas
from atlasfl.methods.base import PARTS, Method, part_of, select

FIVE = ("local_only", "standard_fl", "fedavg_cluster", "atlas_no_laplacian", "atlas")  # the house's own methods
CLUSTERS = [0, 0, 1, 1, 1]  # client id -> discovered cluster
CLIENTS = list(range(len(CLUSTERS)))


def _method(name: str, **kw) -> Method:
    return method_for(build_config("tiny-bert", 0, name, **kw))


def test_the_five_methods_are_registered_baselines_first_atlas_last():
    assert [m for m in METHODS if m in FIVE] == list(FIVE) and METHODS[-1] == "atlas"
    assert all(cls.name == name for name, cls in METHOD_CLASSES.items())


@pytest.mark.parametrize(("name", "groups"), [
    ("local_only", []),
    ("standard_fl", [CLIENTS]),
    ("fedavg_cluster", [[0, 1], [2, 3, 4]]),
    ("atlas_no_laplacian", [[0, 1], [2, 3, 4]]),
    ("atlas", [[0, 1], [2, 3, 4]]),
])
def test_each_method_groups_clients_as_its_rule_says(name, groups):
    assert _method(name).groups(CLIENTS, CLUSTERS) == groups


def test_ranks_and_default_aggregation_follow_the_method():
    five = {name: METHOD_CLASSES[name] for name in FIVE}
    assert {name for name, cls in five.items() if cls.heterogeneous_ranks} == {"local_only", "atlas_no_laplacian",
                                                                               "atlas"}
    assert {name: cls.default_aggregation for name, cls in five.items()} == dict(
        local_only="svd", standard_fl="fedavg", fedavg_cluster="fedavg", atlas_no_laplacian="svd", atlas="svd")


def test_only_methods_whose_groups_or_ranks_use_them_count_fingerprints_as_traffic():
    assert {name for name in FIVE if METHOD_CLASSES[name].uses_fingerprints} == {
        "fedavg_cluster", "atlas_no_laplacian", "atlas"}


def test_atlas_shares_nothing_at_eta_zero_and_owns_the_eta_grid():
    atlas = _method("atlas", lambda_sweep=True, lambda_grid=(0.0, 0.5))
    assert not atlas.shares(0.0) and atlas.shares(0.5)
    assert atlas.etas() == (0.0, 0.5)
    assert _method("atlas", eta=0.3).etas() == (0.3,)
    # Another method with --lambda-sweep still trains one federation: the grid is atlas's.
    assert _method("fedavg_cluster", lambda_sweep=True, lambda_grid=(0.0, 0.5)).etas() == (0.1,)
    assert _method("fedavg_cluster").shares(0.0)


def test_result_names_and_report_labels_come_from_the_method():
    def name(method, **kw):
        return build_config("tiny-bert", 0, method, rounds=3, **kw).run_name

    assert name("atlas") == "atlas_tiny-bert_atlas_seed0_r3"
    assert name("atlas", eta=0.5) == "atlas_tiny-bert_atlas_seed0_r3_eta0.5"
    assert name("atlas", lambda_sweep=True) == "atlas_tiny-bert_atlas_seed0_r3_lsweep"
    assert name("fedavg_cluster", lambda_sweep=True, eta=0.5) == "atlas_tiny-bert_fedavg_cluster_seed0_r3"
    assert Atlas.variant({"eta": 0.5}) == "0.5" and Atlas.variant({"eta": 0.1, "lambda_sweep": True}) == "sweep"
    assert METHOD_CLASSES["fedavg_cluster"].variant({"eta": 0.5}) is None


def test_a_method_declares_its_own_settings_once_and_they_are_flags_of_every_run():
    for name in Atlas.settings:
        assert name in RunConfig.model_fields
        assert RunConfig.model_fields[name].description == Atlas.settings[name][1].description
    with pytest.raises(AtlasError, match="eta"):
        build_config("tiny-bert", 0, "atlas", eta=1.5)  # the method's own constraint (le=1) is enforced


def test_a_method_refuses_settings_it_cannot_honour():
    with pytest.raises(AtlasError, match="always refactors by SVD"):
        build_config("tiny-bert", 0, "atlas", aggregation="fedavg")
    assert build_config("tiny-bert", 0, "atlas_no_laplacian", aggregation="fedavg").aggregation == "fedavg"


@pytest.mark.parametrize("name", METHODS)
def test_every_search_range_names_a_setting_and_both_its_bounds_are_valid_values(name):
    space = METHOD_CLASSES[name].search_space
    assert "lr" in space
    for setting, bounds in space.items():
        assert setting in RunConfig.model_fields and bounds.low < bounds.high
        for value in (bounds.low, bounds.high):
            assert getattr(build_config("tiny-bert", 0, name, **{setting: value}), setting) == value


def test_the_five_methods_train_and_send_every_part_and_add_no_loss_term():
    for cls in map(METHOD_CLASSES.get, FIVE):
        assert cls.trains == cls.uploads == cls.downloads == PARTS
        assert cls(build_config("tiny-bert", 0, cls.name)).extra_loss() is None


def test_a_state_is_split_into_its_parts_by_key():
    state = {"lora::l.0.q::A": torch.zeros(2, 3), "lora::l.0.q::B": torch.zeros(3, 2),
             "head::weight": torch.zeros(2, 3), "head::bias": torch.zeros(2)}
    assert [part_of(k) for k in state] == ["lora_A", "lora_B", "head", "head"]
    assert list(select(state, ("head", "lora_A"))) == ["lora::l.0.q::A", "head::weight", "head::bias"]


def test_a_field_method_in_clusters_gets_a_file_and_a_report_row_of_its_own():
    def name(method, **kw):
        return build_config("tiny-bert", 0, method, rounds=3, **kw).run_name

    assert name("flexlora") == "atlas_tiny-bert_flexlora_seed0_r3"
    assert name("flexlora", sharing="cluster") == "atlas_tiny-bert_flexlora_seed0_r3_cluster"
    assert name("fedprox", sharing="cluster", prox_mu=0.1) == "atlas_tiny-bert_fedprox_seed0_r3_cluster_mu0.1"
    assert METHOD_CLASSES["hetlora"].variant({"sharing": "cluster"}) == "in clusters"
    assert METHOD_CLASSES["hetlora"].variant({"sharing": "all"}) is None
    assert METHOD_CLASSES["fedprox"].variant({"sharing": "cluster", "prox_mu": 0.1}) == "in clusters, mu0.1"
