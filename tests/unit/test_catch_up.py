"""What an absent member of a sharing group is owed (`Method.catch_up`, `Server.aggregate`): the group's latest model
at its own shapes, computed by the group's own rule with the member standing in at weight zero, on hand-checked
cases; and the queue that keeps it until the member is next asked, through a checkpoint."""
from __future__ import annotations

import torch

from atlasfl.federation.server import _missed_from
from atlasfl.phases.aggregation import refactor
from tests.unit.test_server import MODULES, _server, _uploads

IMPORTANCE = {m: float(i + 1) for i, m in enumerate(MODULES)}
ALPHA = 16.0  # build_config's default lora_alpha


def _planned(method, devices=None, **kw):
    server = _server(method, devices, **kw)
    server.plan(_uploads({"a": IMPORTANCE, "b": IMPORTANCE}))  # clusters [0, 1, 2] and [3, 4, 5]
    server.start_eta(server.cfg.eta)
    return server


def _states(server, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {c: {key: torch.randn(shape, generator=g) for key, shape in spec.items()}
            for c, spec in server.expected.items()}


def test_an_absent_member_is_owed_its_groups_shard_weighted_mean_and_nothing_else_changes():
    server = _planned("fedavg_cluster")
    ups = _states(server)
    out = server.aggregate({c: ups[c] for c in (0, 1, 3, 4, 5)}, absent=frozenset({2}), round_idx=1)
    assert set(out) == {0, 1, 3, 4, 5}  # the absent member is delivered nothing now
    missed = server.take_missed([2])
    assert list(missed) == [2] and [r for r, _ in missed[2]] == [1]
    owed = missed[2][0][1]
    for key in ups[2]:  # equal shards: the plain mean of the two participants, the same as theirs
        torch.testing.assert_close(owed[key], (ups[0][key] + ups[1][key]) / 2, rtol=0, atol=1e-6)
        assert torch.equal(owed[key], out[0][key])
    assert server.take_missed([2]) == {}  # handed out once


def test_latest_keeps_only_the_newest_model_and_each_keeps_every_download_in_order():
    latest, each = _planned("fedavg_cluster"), _planned("flora")
    for server in (latest, each):
        ups = _states(server)
        for r in (1, 2):
            server.aggregate({c: ups[c] for c in (0, 1, 3, 4, 5)}, absent=frozenset({2}), round_idx=r)
    assert [r for r, _ in latest.take_missed([2])[2]] == [2]
    assert [r for r, _ in each.take_missed([2])[2]] == [1, 2]


def test_flora_owes_the_absent_member_the_stack_its_participants_got_with_no_rank_of_its_own():
    server = _planned("flora", ("laptop_8gb", "cpu_2gb"))
    ups = _states(server)
    out = server.aggregate({c: ups[c] for c in (0, 1, 3, 4, 5)}, absent=frozenset({2}), round_idx=1)
    owed = server.take_missed([2])[2][0][1]
    assert owed.keys() == out[0].keys()
    for key in owed:
        assert torch.equal(owed[key], out[0][key])  # the same stacked pair: rank r_0 + r_1, nothing of client 2's


def test_the_svd_route_owes_the_rank_r_truncation_of_the_mean_update_at_the_absent_members_ranks():
    server = _planned("atlas_no_laplacian", ("laptop_8gb",))
    ranks = {0: 2, 1: 4, 2: 8, 3: 2, 4: 2, 5: 2}  # the absent member's rank above both participants' (6 in all)
    server.planned.ranks = {c: dict.fromkeys(MODULES, r) for c, r in ranks.items()}
    server.adopt(server.planned)
    ups = _states(server)
    module = MODULES[0]
    server.aggregate({c: ups[c] for c in (0, 1, 3, 4, 5)}, absent=frozenset({2}), round_idx=1)
    owed = server.take_missed([2])[2][0][1]
    a, b = f"lora::{module}::A", f"lora::{module}::B"
    mean = sum(ALPHA / ranks[c] * ups[c][b].double() @ ups[c][a].double() for c in (0, 1)) / 2
    A, B = refactor(mean, ranks[2], ALPHA / ranks[2])
    torch.testing.assert_close(owed[b].double() @ owed[a].double(), B.double() @ A.double(), rtol=1e-5, atol=1e-6)
    assert owed[a].shape == (ranks[2], 64)


def test_a_robust_rule_leaves_the_stand_in_out_of_its_count():
    server = _planned("fedavg_cluster", robust_aggregation="median")
    ups = _states(server)
    for c, value in ((0, 1.0), (1, 2.0)):
        ups[c] = {key: torch.full_like(t, value) for key, t in ups[c].items()}
    server.aggregate({c: ups[c] for c in (0, 1, 3, 4, 5)}, absent=frozenset({2}), round_idx=1)
    owed = server.take_missed([2])[2][0][1]
    assert all(torch.equal(t, torch.full_like(t, 1.5)) for t in owed.values())  # median of {1, 2}; with a zero, 1


def test_a_personal_rule_and_a_method_that_offers_instead_owe_nothing():
    for method in ("atlas", "ifca"):  # ifca's clients catch up through its offers (`IFCA.behind`)
        server = _planned(method, ("laptop_8gb",))
        ups = _states(server)
        sharing = set(server.sharing_clients())
        server.aggregate({c: ups[c] for c in sharing - {2}}, absent=frozenset({2}) & frozenset(sharing),
                         round_idx=1)
        assert server.missed == {}, method


def test_the_queue_survives_a_checkpoint_with_each_shared_download_once():
    server = _planned("flora", ("laptop_8gb", "cpu_2gb"))
    ups = _states(server)
    server.aggregate({c: ups[c] for c in (0, 3, 4)}, absent=frozenset({1, 2, 5}), round_idx=1)
    server.aggregate({c: ups[c] for c in (0, 1, 3)}, absent=frozenset({2, 4, 5}), round_idx=2)
    tensors = server.missed_tensors()
    pointers = [t.untyped_storage().data_ptr() for t in tensors.values()]
    assert len(pointers) == len(set(pointers))  # a safetensors file refuses shared storage
    back = _missed_from({key: t.clone() for key, t in tensors.items()})
    assert back.keys() == server.missed.keys()
    for c, entries in server.missed.items():
        assert [r for r, _ in back[c]] == [r for r, _ in entries]
        for (_, ours), (_, theirs) in zip(entries, back[c]):
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    server.give_back_missed(server.take_missed([2]))
    assert [r for r, _ in server.missed[2]] == [1, 2]
