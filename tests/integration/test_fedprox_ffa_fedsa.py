"""fedprox, ffa_lora and fedsa_lora end to end on a tiny model (in-process): what each trains, what travels and
what the server's rule leaves in every client's state."""
from __future__ import annotations

import pytest
import torch

from atlasfl.engines.inprocess import InProcess
from atlasfl.experiment import run_and_save
from atlasfl.methods.base import select


@pytest.fixture
def rounds_of(monkeypatch):
    """Every client's state after each round of the next in-process run (seen as it is evaluated), its initial
    states and its model: {"states": [...], "initial": {...}, "fm": ...}."""
    seen = {"states": []}
    evaluate = InProcess.evaluate

    def spy(self, round_idx, trained, validate, test=True):
        seen.update(initial=self.initial, fm=self.fm)
        seen["states"].append(self.states())
        return evaluate(self, round_idx, trained, validate, test)

    monkeypatch.setattr(InProcess, "evaluate", spy)
    return seen


def _sent(result):
    """(bytes up, bytes down) of every client in every round."""
    return [[(c["bytes_up"], c["bytes_down"]) for c in r["clients"]] for r in result["round_metrics"]]


def _digests(result):
    return [r["state_digests"] for r in result["round_metrics"]]


def test_fedprox_at_mu_zero_is_standard_fl_bit_for_bit_and_a_positive_mu_moves_the_weights(make_config, tmp_path):
    runs = {}
    for label, method, kw in (("fedavg", "standard_fl", {}), ("mu0", "fedprox", dict(prox_mu=0.0)),
                              ("mu1", "fedprox", dict(prox_mu=1.0))):
        runs[label], _ = run_and_save(make_config(method=method, output_dir=str(tmp_path / label), **kw),
                                      progress=False)
    fedavg, mu0, mu1 = runs["fedavg"], runs["mu0"], runs["mu1"]
    assert _digests(mu0) == _digests(fedavg)
    assert mu0["final_metrics"] == fedavg["final_metrics"]
    assert mu0["communication_costs"]["total_bytes_up"] == fedavg["communication_costs"]["total_bytes_up"]
    for ours, theirs in zip(_digests(mu1), _digests(fedavg)):
        assert set(ours.values()).isdisjoint(theirs.values())  # the term changed every client's weights
    assert len(set(_digests(mu1)[-1].values())) == 1  # still one group's mean: every client alike


def test_ffa_lora_keeps_every_a_at_its_common_start_and_averages_b_and_heads(make_config, rounds_of):
    cfg = make_config(method="ffa_lora", model="tiny-gpt2")  # c_attn: d_out 96 ≠ d_in 32, so B's size is told apart
    result, _ = run_and_save(cfg, progress=False)
    initial, fm, rank = rounds_of["initial"], rounds_of["fm"], cfg.homogeneous_rank
    assert len(rounds_of["states"]) == cfg.rounds
    first = initial[0]
    for states in rounds_of["states"]:
        for cid, state in states.items():
            for key in select(state, ("lora_A",)):
                assert torch.equal(state[key], initial[cid][key]) and torch.equal(state[key], first[key]), key
            for key in select(state, ("lora_B", "head")):  # trained, and one group's shard-weighted mean
                assert torch.equal(state[key], states[0][key]), key
            assert all(not torch.equal(state[k], initial[cid][k]) for k in select(state, ("lora_B",)))
            assert any(not torch.equal(state[k], initial[cid][k]) for k in select(state, ("head",)))
    head = sum(p.numel() for p in fm.heads["0"].parameters())
    expected = 4 * (sum(rank * d_out for d_out, _ in fm.module_shapes().values()) + head)
    assert expected == 4 * (2 * 4 * 96 + 64)  # two c_attn at r = 4, a 32×2 head without bias
    assert _sent(result) == [[(expected, expected)] * 4] * cfg.rounds


def test_ffa_lora_refuses_the_svd_aggregation_in_one_line():
    from atlasfl.config import build_config
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="ffa_lora averages B under a frozen common A") as info:
        build_config("tiny-bert", 0, "ffa_lora", aggregation="svd")
    assert "\n" not in str(info.value)


def test_fedsa_lora_averages_the_as_and_leaves_each_client_its_own_b_and_head(make_config, deliveries):
    cfg = make_config(method="fedsa_lora", model="tiny-gpt2")  # c_attn: d_in 32 ≠ d_out 96
    result, _ = run_and_save(cfg, progress=False)
    assert len(deliveries) == cfg.rounds
    for _, before, after, _ in deliveries:
        for cid, state in after.items():
            for key in select(state, ("lora_A",)):  # the group's mean, not the client's own trained A
                assert torch.equal(state[key], after[0][key]) and not torch.equal(state[key], before[cid][key])
            for key in select(state, ("lora_B", "head")):  # untouched by the server
                assert torch.equal(state[key], before[cid][key]), key
        for part in ("lora_B", "head"):  # trained locally on different shards: every client's differs
            for key in select(after[0], (part,)):
                assert len({after[cid][key].numpy().tobytes() for cid in after}) == len(after), key
    fm, rank = deliveries[0][3].fm, cfg.homogeneous_rank
    expected = 4 * sum(rank * d_in for _, d_in in fm.module_shapes().values())
    assert expected == 4 * 2 * 4 * 32
    assert _sent(result) == [[(expected, expected)] * 4] * cfg.rounds
