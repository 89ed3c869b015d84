"""Server optimisers (phases.server_optimizer): each rule on hand-computed numbers, the same steps as Flower 1.42's
own FedAvgM/FedAdam/FedYogi on the same arrays, and where the aggregation rules apply the step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atlasfl.phases.aggregation import aggregate_states, mean_of_parts, sparsity_weighted_zero_pad
from atlasfl.phases.server_optimizer import ServerOptimizer, ServerRule


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_avgm_is_flowers_fedavgm_on_hand_computed_numbers_after_a_first_round_that_passes_through():
    opt = ServerOptimizer(ServerRule("avgm", lr=0.5, momentum=0.5))
    first = _t(1.0, 2.0)
    assert opt.step("0,1", "k", first) is first  # nothing to step from yet: the aggregate becomes x
    # g = x − agg = [1, −2]; v = g; x − 0.5·v = [0.5, 3]
    assert torch.equal(opt.step("0,1", "k", _t(0.0, 4.0)), _t(0.5, 3.0))
    # g = [0.5, 3] − [0.5, 1] = [0, 2]; v = 0.5·[1, −2] + [0, 2] = [0.5, 1]; x = [0.5 − 0.25, 3 − 0.5]
    assert torch.equal(opt.step("0,1", "k", _t(0.5, 1.0)), _t(0.25, 2.5))
    assert torch.equal(opt.state["0,1"]["k"]["v"], _t(0.5, 1.0)) and int(opt.state["0,1"]["k"]["t"]) == 2


def test_sgd_at_another_lr_is_avgm_without_momentum():
    rule = ServerRule.of(type("Cfg", (), dict(server_optimizer="sgd", server_lr=0.25))())
    assert rule == ServerRule("avgm", lr=0.25)
    opt = ServerOptimizer(rule)
    opt.step("g", "k", _t(1.0))
    assert torch.equal(opt.step("g", "k", _t(5.0)), _t(2.0))  # 1 + 0.25·(5 − 1)
    assert torch.equal(opt.step("g", "k", _t(2.0)), _t(2.0))  # no momentum carried: a zero step
    assert ServerRule.of(type("Cfg", (), dict(server_optimizer="sgd", server_lr=None))()) is None


def _two_steps(name: str):
    """x after the pass-through [1, 2], then agg [3, 1] (Δ = [2, −1]), then agg x1 + [0.1, 0.3]."""
    opt = ServerOptimizer(ServerRule(name, lr=0.1 if name == "adam" else 0.01))
    opt.step("g", "k", _t(1.0, 2.0))
    x1 = opt.step("g", "k", _t(3.0, 1.0))
    x2 = opt.step("g", "k", x1 + _t(0.1, 0.3))
    return x1.tolist(), x2.tolist(), opt.state["g"]["k"]


def test_adam_with_kingma_and_bas_bias_correction_on_hand_computed_numbers():
    x1, x2, state = _two_steps("adam")
    # t = 1: m = 0.1·Δ = [0.2, −0.1], v = 0.01·Δ² = [0.04, 0.01], η_1 = 0.1·√(1 − 0.99)/(1 − 0.9) = 0.1
    assert x1 == pytest.approx([1 + 0.1 * 0.2 / (0.2 + 1e-3), 2 - 0.1 * 0.1 / (0.1 + 1e-3)], rel=1e-14)
    # t = 2: Δ = [0.1, 0.3], m = 0.9·m + 0.1·Δ = [0.19, −0.06], v = 0.99·v + 0.01·Δ² = [0.0397, 0.0108],
    # η_2 = 0.1·√(1 − 0.99²)/(1 − 0.9²)
    eta2 = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    assert state["m"].tolist() == pytest.approx([0.19, -0.06], rel=1e-12)
    assert state["v"].tolist() == pytest.approx([0.0397, 0.0108], rel=1e-12)
    expected = [x1[0] + eta2 * 0.19 / (math.sqrt(0.0397) + 1e-3), x1[1] - eta2 * 0.06 / (math.sqrt(0.0108) + 1e-3)]
    assert x2 == pytest.approx(expected, rel=1e-12)


def test_yogi_moves_its_second_moment_by_the_sign_rule_without_bias_correction():
    x1, x2, state = _two_steps("yogi")
    # t = 1 from v = 0: v = 0 − 0.01·Δ²·sign(0 − Δ²) = [0.04, 0.01], as adam's; the step is η = 0.01 itself
    assert x1 == pytest.approx([1 + 0.01 * 0.2 / (0.2 + 1e-3), 2 - 0.01 * 0.1 / (0.1 + 1e-3)], rel=1e-14)
    # t = 2: Δ² = [0.01, 0.09]: v − Δ² = [+, −], so v = [0.04 − 0.0001, 0.01 + 0.0009] (adam: [0.0397, 0.0108])
    assert state["v"].tolist() == pytest.approx([0.0399, 0.0109], rel=1e-12)
    expected = [x1[0] + 0.01 * 0.19 / (math.sqrt(0.0399) + 1e-3), x1[1] - 0.01 * 0.06 / (math.sqrt(0.0109) + 1e-3)]
    assert x2 == pytest.approx(expected, rel=1e-12)


@pytest.fixture
def flower_reply(monkeypatch):
    """One training reply carrying `arrays` (one client of weight 1: Flower's weighted average is the arrays)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def reply(arrays: dict[str, np.ndarray]):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=Message(content, dst_node_id=1, message_type="train"))
    return reply


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_three_steps_equal_flowers_own_strategy(name, flower_reply):
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

    rng = np.random.default_rng(7)
    aggregates = [{"A": rng.normal(size=(2, 3)), "head": rng.normal(size=4)} for _ in range(4)]
    ours = ServerOptimizer(ServerRule(name, lr=0.3, momentum=0.7, beta1=0.8, beta2=0.95, tau=1e-2))
    theirs = {"avgm": lambda: FedAvgM(server_learning_rate=0.3, server_momentum=0.7),
              "adam": lambda: FedAdam(eta=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2),
              "yogi": lambda: FedYogi(eta=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2)}[name]()
    x = {k: ours.step("g", k, torch.from_numpy(v)).numpy() for k, v in aggregates[0].items()}  # both start here
    for t, agg in enumerate(aggregates[1:], start=1):
        mine = {k: ours.step("g", k, torch.from_numpy(v)).numpy() for k, v in agg.items()}
        if name == "avgm":
            theirs.current_arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
        else:
            theirs.current_arrays = x
        # Flower's FedAdam corrects with exponent server_round + 1; ours with t, the step count: round t − 1
        record, _ = theirs.aggregate_train(t - 1, [flower_reply(agg)])
        x = {k: a.numpy() for k, a in record.items()}
        for k in agg:  # torch's float64 sqrt on CPU is not always correctly rounded (numpy's is): an ulp apart
            np.testing.assert_allclose(mine[k], x[k], rtol=0 if name == "avgm" else 1e-14, atol=0)


def test_a_state_grows_along_the_rank_axis_by_zero_padding():
    opt = ServerOptimizer(ServerRule("avgm", lr=1.0, momentum=0.5))
    opt.step("g", "A", _t(1.0, 1.0)[:, None])  # rank 2
    out = opt.step("g", "A", _t(0.0, 0.0, 4.0)[:, None])  # rank 3: x padded with a zero row
    assert out.flatten().tolist() == [0.0, 0.0, 4.0]
    out = opt.step("g", "A", _t(0.0, 0.0)[:, None])  # back to rank 2: the aggregate padded with zero
    # g = [0, 0, 4]; v = 0.5·[1, 1, −4] + [0, 0, 4] = [0.5, 0.5, 2]; x = [−0.5, −0.5, 2]
    assert out.flatten().tolist() == [-0.5, -0.5, 2.0]


def _recorder():
    seen = {}

    def step(key, agg):
        seen[key] = agg.clone()
        return agg + 1.0
    return seen, step


def test_the_rules_hand_their_group_average_to_the_step_and_share_its_result_out():
    states = [{"lora::m::A": torch.ones(1, 2), "lora::m::B": torch.zeros(2, 1), "head::weight": torch.ones(2, 2)},
              {"lora::m::A": 3 * torch.ones(1, 2), "lora::m::B": torch.ones(2, 1), "head::weight": torch.zeros(2, 2)}]
    seen, step = _recorder()
    out = aggregate_states(states, [1, 1], alpha=1.0, mode="fedavg", step=step)
    assert set(seen) == {"lora::m::A", "lora::m::B", "head::weight@2x2"}
    assert torch.equal(seen["lora::m::A"], 2 * torch.ones(1, 2))
    assert all(torch.equal(s["lora::m::A"], 3 * torch.ones(1, 2)) for s in out)  # the step's result, for both
    assert all(torch.equal(s["head::weight"], 1.5 * torch.ones(2, 2)) for s in out)
    # svd: the dense mean ΔW = mean of (α/r)·B@A = ½·(0 + [[3, 3], [3, 3]]), stepped, refactored at rank 1
    seen, step = _recorder()
    out = aggregate_states(states, [1, 1], alpha=1.0, mode="svd", step=step)
    assert torch.equal(seen["lora::m::dW"], torch.full((2, 2), 1.5, dtype=torch.float64))
    for s in out:
        assert torch.allclose(s["lora::m::B"] @ s["lora::m::A"], torch.full((2, 2), 2.5), atol=1e-6)
    seen, step = _recorder()
    out = mean_of_parts([{"lora::m::A": s["lora::m::A"]} for s in states], [1, 3], step)
    assert torch.equal(seen["lora::m::A"], 2.5 * torch.ones(1, 2)) and torch.equal(out[0]["lora::m::A"],
                                                                                 3.5 * torch.ones(1, 2))
    new = sparsity_weighted_zero_pad([(s["lora::m::A"], s["lora::m::B"]) for s in states], [1, 1],
                                     lambda A, B: (A * 0, B * 0))
    assert all(not A.any() and not B.any() for A, B in new)


def _server(method, **kw):
    from atlasfl.config import build_config
    from atlasfl.federation.server import ClientInfo, Server
    from atlasfl.methods import method_for
    from atlasfl.phases.devices import ModelFacts

    cfg = build_config("tiny-bert", 0, method, tasks=("generated",), **kw)
    facts = ModelFacts(total_params=1000, hidden_size=4, num_layers=1, intermediate_size=8, num_heads=1,
                       vocab_size=10, family="bert", dtype_bytes=4)
    server = Server(cfg, method_for(cfg), [ClientInfo(c, "t", 10 * (c + 1), 2) for c in range(4)], modules=["m"],
                    shapes={"m": (2, 2)}, facts=facts)
    server.cluster_labels, server.affinity_space = [0, 0, 1, 1], np.zeros((4, 2))
    return server


def _upload(value: float):
    return {"lora::m::A": torch.full((1, 2), value), "lora::m::B": torch.full((2, 1), value)}


def test_the_server_keeps_one_state_per_sharing_group_even_when_a_member_is_missing():
    server = _server("fedavg_cluster", server_optimizer="avgm", server_lr=1.0, server_momentum=0.5)
    server.start_eta(0.1)
    first = server.aggregate({0: _upload(1.0), 1: _upload(1.0), 2: _upload(2.0), 3: _upload(9.0)})
    assert first[3]["lora::m::A"].tolist() == [[6.0, 6.0]]  # (2·30 + 9·40)/70: the first average passes through
    assert sorted(server.optimizer.state) == ["0,1", "2,3"]
    second = server.aggregate({0: _upload(3.0), 2: _upload(2.0), 3: _upload(2.0)}, missing=frozenset({1}))
    assert sorted(server.optimizer.state) == ["0,1", "2,3"] and 1 not in second
    assert second[0]["lora::m::A"].tolist() == [[3.0, 3.0]]  # x = 1, agg 3 (client 0 alone): g = −2, v = g, x − v
    # group 2,3: x = 6, agg 2: g = 4, v = g, x − v = 2
    assert second[2]["lora::m::B"].tolist() == [[2.0], [2.0]]
    saved = server.optimizer_state()
    server.start_eta(0.1)  # a new eta starts afresh...
    assert server.optimizer.state == {}
    server.start_eta(0.1, saved)  # ...or where a checkpoint left it
    assert torch.equal(server.optimizer.state["0,1"]["lora::m::A"]["v"], torch.full((1, 2), -2.0))


def test_a_rule_that_ignores_the_step_is_refused_rather_than_silently_unstepped(monkeypatch):
    from atlasfl.errors import AtlasError
    from atlasfl.methods.fedavg_cluster import FedAvgCluster

    monkeypatch.setattr(FedAvgCluster, "aggregate", lambda self, states, group: states)
    server = _server("fedavg_cluster", server_optimizer="adam")
    server.start_eta(0.1)
    with pytest.raises(AtlasError, match="fedavg_cluster's rule never handed its group average to the server"):
        server.aggregate({c: _upload(1.0) for c in range(4)})


@pytest.mark.parametrize(("method", "kw", "message"), [
    ("atlas", dict(server_optimizer="adam"), "atlas forms no group average for a server optimiser to step"),
    ("local_only", dict(server_lr=0.5), "local_only forms no group average"),
    ("standard_fl", dict(server_optimizer="adam", server_momentum=0.5),
     "--server-momentum applies to --server-optimizer avgm, not adam"),
    ("flexlora", dict(server_optimizer="avgm", server_tau=0.1),
     "--server-tau applies to --server-optimizer adam or yogi"),
    ("hetlora", dict(server_beta2=0.9), "--server-beta2 applies to --server-optimizer adam or yogi, not sgd"),
])
def test_a_server_optimiser_where_it_cannot_apply_is_one_line_error(method, kw, message):
    from atlasfl.config import build_config
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match=message) as err:
        build_config("tiny-bert", 0, method, **kw)
    assert "\n" not in str(err.value)
    assert build_config("tiny-bert", 0, "atlas", server_optimizer="sgd", server_lr=1.0).server_optimizer == "sgd"


def test_a_server_optimiser_names_its_own_result_file_and_report_row():
    from atlasfl.config import build_config
    from atlasfl.report.records import eta_label

    def name(method, **kw):
        return build_config("tiny-bert", 0, method, rounds=2, **kw).run_name.removeprefix("atlas_tiny-bert_")

    assert name("standard_fl", server_optimizer="sgd", server_lr=1.0) == name("standard_fl") == "standard_fl_seed0_r2"
    assert name("standard_fl", server_optimizer="adam") == "standard_fl_seed0_r2_adam"
    assert name("flexlora", server_optimizer="avgm", server_lr=0.5, server_momentum=0.5) == \
        "flexlora_seed0_r2_avgm_lr0.5_mu0.5"
    config = build_config("tiny-bert", 0, "fedprox", prox_mu=0.1, server_optimizer="yogi").model_dump(mode="json")
    assert eta_label("fedprox", config) == "mu0.1, yogi"
    assert eta_label("standard_fl", {"server_optimizer": "sgd"}) is None  # and results written before it
