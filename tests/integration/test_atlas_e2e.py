"""End to end on tiny models: the atlas methods do what they claim to the weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.engines import inprocess
from atlasfl.experiment import run_and_save
from atlasfl.federation import driver
from atlasfl.federation.server import Server
from atlasfl.federation.wire import wire
from atlasfl.models.lora import state_digest
from atlasfl.phases.clustering import centred_unit_rows
from atlasfl.results.schema import validate_result
from tests.conftest import TINY_MODELS, force_clusters, state_floats


def _digests(result, r=-1):
    d = result["round_metrics"][r]["state_digests"]
    return [d[str(c["client_id"])] for c in result["clients"]]


def _bytes(result, r, direction):
    return [c[f"bytes_{direction}"] for c in result["round_metrics"][r]["clients"]]


def _run(make_config, **kw):
    result, _ = run_and_save(make_config(**kw), progress=False)
    validate_result(result)
    return result


@pytest.fixture
def spy(monkeypatch):
    """What the in-process engine ran: the driver's Federation (its server, and its transport holding the model
    and data), and per aggregation the states the server received and the states it returned."""
    seen = dict(fed=None, exchanges=[])
    plan_or_restore, aggregate = driver.plan_or_restore, Server.aggregate

    def spy_plan_or_restore(*args):
        seen["fed"] = plan_or_restore(*args)
        return seen["fed"]

    def spy_aggregate(self, uploads, *args):
        out = aggregate(self, uploads, *args)
        seen["exchanges"].append((uploads, out))
        return out

    monkeypatch.setattr(driver, "plan_or_restore", spy_plan_or_restore)
    monkeypatch.setattr(Server, "aggregate", spy_aggregate)
    return seen


def _delta(state, module, alpha):
    A, B = state[f"lora::{module}::A"].double(), state[f"lora::{module}::B"].double()
    return alpha / A.shape[0] * B @ A


@pytest.mark.parametrize("model", TINY_MODELS)
def test_atlas_eta_zero_reproduces_local_only_and_eta_positive_differs(make_config, model):
    # Oracle clusters: every client has cluster mates, so η > 0 must move every one of them. (Whether the
    # tiny config's fingerprints find the tasks is phase 1's business: tests/integration/test_fingerprints.py.)
    local = _run(make_config, model=model, method="local_only")
    eta0 = _run(make_config, model=model, method="atlas", eta=0.0, clusters="oracle")
    eta_pos = _run(make_config, model=model, method="atlas", eta=0.5, clusters="oracle")
    assert local["ranks"] == eta0["ranks"] == eta_pos["ranks"]
    for result in (local, eta0, eta_pos):  # the tests' own configuration is clustered into its true tasks
        assert result["phase1_clustering"]["ari"] == 1.0 and result["cluster_labels"] == [0, 0, 1, 1]
        assert result["phase1_clustering"]["margin"] > 0
    for r in range(len(local["round_metrics"])):
        assert _digests(local, r) == _digests(eta0, r)
        assert _bytes(eta0, r, "up") == _bytes(eta0, r, "down") == [0] * len(local["clients"])
    assert local["final_metrics"] == eta0["final_metrics"]
    # every client moved away from its own local training, and each holds its own personalised state
    assert all(a != b for a, b in zip(_digests(eta_pos, 0), _digests(local, 0)))
    assert len(set(_digests(eta_pos))) == len(eta_pos["clients"])
    assert all(b > 0 for b in _bytes(eta_pos, 0, "up") + _bytes(eta_pos, 0, "down"))


def test_atlas_no_laplacian_shares_the_cluster_mean_at_equal_ranks(make_config):
    # One device profile for all: equal rank maps inside a cluster, so the cluster mean is shared exactly.
    result = _run(make_config, model="tiny-gpt2", method="atlas_no_laplacian", devices=("gpu_16gb",),
                  fingerprint_samples=64, max_samples=80)
    labels, ranks = result["cluster_labels"], result["ranks"]
    for r in range(len(result["round_metrics"])):
        digests = _digests(result, r)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if ranks[str(i)] == ranks[str(j)]:
                    assert (digests[i] == digests[j]) == (labels[i] == labels[j])
    assert result["cluster_source"] == "fingerprint"
    assert result["phase1_clustering"]["ari"] == 1.0


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_eta_zero_is_local_only_at_every_wire_dtype(make_config, wire_dtype):
    """At η = 0 nothing travels, so no quantised round trip can change a client's state."""
    local = _run(make_config, model="tiny-bert", method="local_only", wire_dtype=wire_dtype)
    eta0 = _run(make_config, model="tiny-bert", method="atlas", eta=0.0, wire_dtype=wire_dtype)
    for r in range(len(local["round_metrics"])):
        assert _digests(eta0, r) == _digests(local, r)
        assert eta0["round_metrics"][r]["bytes_up_total"] == eta0["round_metrics"][r]["bytes_down_total"] == 0
    assert eta0["final_metrics"] == local["final_metrics"]


def test_a_client_alone_in_its_cluster_is_untouched_and_sends_nothing(make_config, monkeypatch):
    """Clusters {0, 1}, {2}, {3}: clients 2 and 3 have nobody to share with. They keep exactly their local
    training (digest for digest with local_only) and count 0 bytes; 0 and 1 share at the exact float32 size."""
    local = _run(make_config, model="tiny-bert", method="local_only")
    force_clusters(monkeypatch, [0, 0, 1, 2])
    shared = _run(make_config, model="tiny-bert", method="atlas_no_laplacian")
    assert shared["cluster_labels"] == [0, 0, 1, 2] and shared["ranks"] == local["ranks"]
    for r in range(len(shared["round_metrics"])):
        ours, theirs = _digests(shared, r), _digests(local, r)
        assert ours[2:] == theirs[2:] and ours[0] != theirs[0] and ours[1] != theirs[1]
        for direction in ("up", "down"):
            sent = _bytes(shared, r, direction)
            assert sent[2:] == [0, 0]
            assert sent[:2] == [4 * state_floats("tiny-bert", shared["ranks"][str(c)], 2) for c in (0, 1)]


def test_heterogeneous_ranks_are_applied_to_the_model_and_travel_at_those_shapes(make_config, spy):
    """The plan's per-module ranks are the shapes of the PEFT adapters (lora_A r×d_in, lora_B d_out×r), their
    scaling α/r acts in the forward pass, and they are the shapes that travel, both ways."""
    cfg = make_config(model="tiny-bert", method="atlas", eta=0.5, devices=("cpu_2gb", "gpu_16gb"), clients_per_task=3,
                      clusters="oracle")
    result, _ = run_and_save(cfg, progress=False)
    fm, plan_ranks = spy["fed"].transport.fm, {int(c): r for c, r in result["ranks"].items()}
    alloc = result["phase2_rank_allocation"]["clients"]
    assert {c["device"] for c in alloc.values()} == {"cpu_2gb", "gpu_16gb"}
    assert all(info["ranks"] == result["ranks"][cid] and info["feasible"] for cid, info in alloc.items())
    assert any(len(set(r.values())) >= 2 for r in plan_ranks.values())  # two ranks within one client
    assert len({tuple(sorted(r.items())) for r in plan_ranks.values()}) >= 2  # and different maps across clients
    shapes = fm.module_shapes()
    torch.manual_seed(0)
    for cid, ranks in plan_ranks.items():
        fm.activate(cid, train=False)
        for m, r in ranks.items():
            layer = fm.peft.base_model.model.get_submodule(m)
            A, B = layer.lora_A[f"c{cid}"].weight, layer.lora_B[f"c{cid}"].weight
            d_out, d_in = shapes[m]
            assert A.shape == (r, d_in) and B.shape == (d_out, r)
            assert layer.scaling[f"c{cid}"] == pytest.approx(cfg.lora_alpha / r)
            x = torch.randn(3, d_in)
            with torch.no_grad():  # what the adapter adds in the forward pass is (α/r)·B·A
                added = layer(x) - layer.base_layer(x)
            assert torch.allclose(added, x @ (cfg.lora_alpha / r * B @ A).T, atol=1e-6)
    assert len(spy["exchanges"]) == cfg.rounds
    for r, (uploads, returned) in enumerate(spy["exchanges"]):
        for states in (uploads, returned):
            assert sorted(states) == sorted(plan_ranks)
            for cid, state in states.items():
                for m, rank in plan_ranks[cid].items():
                    assert state[f"lora::{m}::A"].shape == (rank, shapes[m][1])
                    assert state[f"lora::{m}::B"].shape == (shapes[m][0], rank)
        # float32 on the wire: 4 bytes a number, each client at its own ranks, both directions
        expected = [4 * state_floats("tiny-bert", plan_ranks[c], 2) for c in sorted(plan_ranks)]
        assert _bytes(result, r, "up") == _bytes(result, r, "down") == expected
    by_device = {}
    for info in alloc.values():
        by_device.setdefault(info["device"], set()).add(info["total_rank"])
    assert max(by_device["cpu_2gb"]) < min(by_device["gpu_16gb"])
    assert "ESTIMATE" in result["phase2_rank_allocation"]["memory_model"]
    assert "ESTIMATE" in result["memory"]["estimate"]["kind"]


def test_laplacian_step_of_a_run_is_the_formula_on_each_clients_own_update(make_config, spy):
    """In a real run, what the server returns is, per client and module, the rank-r_k truncation of
    ΔW_k − η Σ_l a_kl (ΔW_k − ΔW_l) over the clients' uploaded (own, locally trained) updates, with a from
    the run's fingerprints; and it is what each client then holds."""
    eta = 0.5
    cfg = make_config(model="tiny-bert", method="atlas", eta=eta, devices=("cpu_2gb", "gpu_16gb"), clusters="oracle",
                      rounds=1)
    result, _ = run_and_save(cfg, progress=False)
    (uploads, returned), = spy["exchanges"]
    labels = result["cluster_labels"]
    space = centred_unit_rows(np.asarray(result["phase1_clustering"]["fingerprints"], dtype=np.float64))
    for label in set(labels):
        group = [c for c in range(len(labels)) if labels[c] == label]
        f = space[group]
        sq = ((f[:, None] - f[None]) ** 2).sum(-1)
        a = np.exp(-sq / np.median(sq[~np.eye(len(group), dtype=bool)]))
        a /= a.sum(1, keepdims=True)
        for i, k in enumerate(group):
            for m, r in result["ranks"][str(k)].items():
                own = _delta(uploads[k], m, cfg.lora_alpha)
                target = own - eta * sum(a[i, j] * (own - _delta(uploads[n], m, cfg.lora_alpha))
                                         for j, n in enumerate(group))
                U, S, Vh = torch.linalg.svd(target, full_matrices=False)
                expected = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
                got = _delta(returned[k], m, cfg.lora_alpha)
                assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()) + 1e-9)
    for cid, state in returned.items():
        assert result["round_metrics"][0]["state_digests"][str(cid)] == state_digest(wire(state, "float32")[0])


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fedavg_cluster_groups_the_true_tasks(make_config, model, seed):
    # The seeds the end-to-end tests run. This configuration (4 clients of 22 examples on 32-wide random
    # models) is the hardest one measured: docs/clustering.md gives its record over seeds 0-49.
    result = _run(make_config, model=model, method="fedavg_cluster", seed=seed, rounds=1)
    phase1 = result["phase1_clustering"]
    assert result["cluster_source"] == "fingerprint" and result["cluster_labels"] == [0, 0, 1, 1]
    assert phase1["ari"] == 1.0 and phase1["k"] == 2 and phase1["margin"] > 0, phase1["tightness_by_k"]
    # every k under its bar, and the split test against k = 3 that did not find it fitting too
    assert phase1["passing_k"] == [k for k in (1, 2, 3) if phase1["tightness_by_k"][str(k)] <=
                                   phase1["threshold_by_k"][str(k)]] and phase1["passing_k"][0] == 2
    assert phase1["ambiguous"] is False and phase1["split"]["k_next"] == 3
    assert phase1["split"]["statistic"] <= phase1["split"]["threshold"]


def test_oracle_clusters_flag(make_config):
    result = _run(make_config, model="tiny-bert", method="fedavg_cluster", clusters="oracle")
    assert result["cluster_source"] == "oracle"
    assert result["cluster_labels"] == [0, 0, 1, 1]


def _rig_scores(monkeypatch, spy, val_score, test_score):
    """Rig local-validation scores to `val_score(eta, cid)` and both test protocols to `test_score(eta, cid)`."""
    evaluate, tests = inprocess.evaluate_client, inprocess.test_scores

    def rigged_val(fm, cid, encoded, task, batch_size, **kw):
        assert encoded is spy["fed"].transport.val_enc[cid]  # the engine's only other evaluation: local validation
        return dict(evaluate(fm, cid, encoded, task, batch_size, **kw), score=val_score(spy["fed"].server.eta, cid))

    def rigged_test(task, predictions, personal):
        cid = next(s.client_id for s in spy["fed"].transport.shards if s.personal is personal)
        score = test_score(spy["fed"].server.eta, cid)
        ev = tests(task, predictions, personal)
        return dict(ev, score=score, personal=dict(ev["personal"], score=score))

    monkeypatch.setattr(inprocess, "evaluate_client", rigged_val)
    monkeypatch.setattr(inprocess, "test_scores", rigged_test)


def test_lambda_sweep_selects_eta_on_local_validation_not_on_test(make_config, monkeypatch, spy):
    """Scores are rigged so local validation prefers the largest η and the test set the smallest: the run
    must choose, and report, the validation one."""
    grid = (0.0, 0.5, 1.0)
    _rig_scores(monkeypatch, spy, val_score=lambda eta, cid: eta, test_score=lambda eta, cid: 1.0 - eta)
    result = _run(make_config, model="tiny-bert", method="atlas", lambda_sweep=True, lambda_grid=grid, rounds=1)
    sweep = result["lambda_sweep"]
    assert sweep["grid"] == list(grid)
    assert sweep["val_scores"] == pytest.approx(list(grid)) and sweep["test_scores"] == pytest.approx([1, 0.5, 0])
    assert sweep["personal_test_scores"] == pytest.approx([1, 0.5, 0])
    assert sweep["selected_eta"] == grid[int(np.argmax(sweep["val_scores"]))] == 1.0
    assert result["round_metrics"][-1]["lambda_eta"] == 1.0
    assert result["round_metrics"][-1]["mean_task_score"] == sweep["test_scores"][2]
    # The sweep trained and sent every eta's federation: its costs say so, beside the chosen eta's.
    comm, clock = result["communication_costs"], result["time_metrics"]
    assert [e["eta"] for e in comm["per_eta"]] == list(grid)
    assert comm["sweep_total_bytes_up"] == comm["fingerprint_bytes_up"] + sum(e["bytes_up"] for e in comm["per_eta"])
    assert comm["sweep_total_bytes_down"] == sum(e["bytes_down"] for e in comm["per_eta"]) > comm["total_bytes_down"]
    assert [(r["eta"], r["round"]) for r in clock["rounds"]] == [(eta, 1) for eta in grid]
    assert clock["totals"]["rounds"] == 3
    assert clock["totals"]["train"]["examples"] == 3 * sum(c["num_train"] for c in result["clients"])


def test_round_costs_count_the_work(make_config):
    result = _run(make_config, model="tiny-bert", method="fedavg_cluster")
    comm, rounds = result["communication_costs"], result["time_metrics"]["rounds"]
    assert comm.get("sweep_total_bytes_up") is None
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["train"]["examples"] == sum(c["num_train"] for c in result["clients"])
        assert 0 < r["train"]["real_tokens"] <= r["train"]["padded_tokens"]
        assert 0 < r["evaluate"]["examples"] and r["checkpoint_s"] > 0


def test_per_client_eta_selection_reads_only_local_validation(make_config, monkeypatch, spy):
    """Each client's validation prefers its own η (client k: grid[k % 3]) and its test sets the η after it: a
    choice that peeked at a test set would differ for every client. Both choices are recorded; the setting
    picks the headline, and no η is trained twice."""
    grid = (0.0, 0.5, 1.0)
    _rig_scores(monkeypatch, spy, val_score=lambda eta, cid: float(eta == grid[cid % 3]),
                test_score=lambda eta, cid: float(eta == grid[(cid + 1) % 3]))
    result = _run(make_config, model="tiny-bert", method="atlas", lambda_sweep=True, lambda_grid=grid, rounds=1,
                  eta_selection="per_client")
    selections = result["lambda_sweep"]["selections"]
    assert selections["headline"] == "per_client"
    assert selections["per_client"]["etas"] == {str(c): grid[c % 3] for c in range(4)}
    own = selections["per_client"]["final_metrics"]
    assert result["final_metrics"] == own
    for m in own["per_client"].values():
        assert m["val_score"] == 1.0 and m["score"] == m["personal_score"] == 0.0  # validation's choice, not test's
    # shared: eta 0.0 has the best mean validation score (clients 0 and 3 prefer it)
    assert selections["shared"]["eta"] == result["lambda_sweep"]["selected_eta"] == 0.0
    shared = selections["shared"]["final_metrics"]["per_client"]
    assert [shared[str(c)]["val_score"] for c in range(4)] == [1.0, 0.0, 0.0, 1.0]  # every client at eta 0.0
    assert result["time_metrics"]["totals"]["rounds"] == len(grid)
