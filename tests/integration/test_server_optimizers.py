"""Server optimisers end to end on tiny-bert: sgd at lr 1 is the plain run bit for bit; adam changes the states
from its first step (round 2: round 1's aggregate only becomes the server's x), resumes from a checkpoint exactly
as the uninterrupted run, and runs alike on Flower's Simulation Runtime."""
from __future__ import annotations

import pytest

import atlasfl.results.checkpoint as ckpt
from atlasfl.experiment import run_and_save


def _digests(result):
    return [r["state_digests"] for r in result["round_metrics"]]


def _run(make_config, tmp_path, label, **kw):
    result, _ = run_and_save(make_config(output_dir=str(tmp_path / label), checkpoint_dir=str(tmp_path / f"ck-{label}"),
                                         **kw), progress=False)
    return result


def test_sgd_at_server_lr_1_is_the_plain_run_and_avgm_moves_from_round_2(make_config, tmp_path):
    plain = _run(make_config, tmp_path, "plain", method="standard_fl")
    sgd = _run(make_config, tmp_path, "sgd", method="standard_fl", server_optimizer="sgd", server_lr=1.0)
    avgm = _run(make_config, tmp_path, "avgm", method="standard_fl", server_optimizer="avgm")
    assert _digests(sgd) == _digests(plain) and sgd["final_metrics"] == plain["final_metrics"]
    assert _digests(avgm)[0] == _digests(plain)[0]  # round 1's aggregate passes through: it becomes x
    assert set(_digests(avgm)[1].values()).isdisjoint(_digests(plain)[1].values())
    assert len(set(_digests(avgm)[1].values())) == 1  # one group: every client receives the server's x


@pytest.mark.parametrize("method", ["standard_fl", "flexlora"])  # per-key factors; dense ΔW at mixed ranks
def test_adam_resumed_after_round_2_equals_the_uninterrupted_run(make_config, tmp_path, monkeypatch, method):
    kw = dict(method=method, rounds=3, server_optimizer="adam")
    whole = _run(make_config, tmp_path, "whole", **kw)
    plain = _run(make_config, tmp_path, "plain", method=method, rounds=3)
    if method == "standard_fl":  # flexlora's dense-ΔW SVD rounds otherwise than its plain route's QR-reduced one
        assert _digests(whole)[0] == _digests(plain)[0]
    for ours, theirs in zip(_digests(whole)[1:], _digests(plain)[1:]):
        assert set(ours.values()).isdisjoint(theirs.values())
    real, calls = ckpt.save_file, {"n": 0}

    def dying_writer(tensors, filename):
        calls["n"] += 1
        if calls["n"] == 4:  # round 3's checkpoint (round 0 is the plan): the run stops after round 2's
            raise KeyboardInterrupt
        assert calls["n"] < 3 or any(k.startswith(ckpt.SERVER_PREFIX) and k.endswith("/m") for k in tensors)
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", dying_writer)
    cfg = make_config(output_dir=str(tmp_path / "cut"), checkpoint_dir=str(tmp_path / "ck-cut"), **kw)
    with pytest.raises(KeyboardInterrupt):
        run_and_save(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_file", real)
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert _digests(resumed) == _digests(whole)
    assert resumed["final_metrics"] == whole["final_metrics"]


def test_yogi_on_flower_matches_the_inprocess_engine(make_config, tmp_path):
    kw = dict(method="fedavg_cluster", server_optimizer="yogi", server_lr=0.05)
    inproc = _run(make_config, tmp_path, "a", **kw)
    flower = _run(make_config, tmp_path, "b", engine="flower", **kw)
    assert _digests(flower) == _digests(inproc)
    assert flower["final_metrics"] == inproc["final_metrics"]


@pytest.mark.parametrize("method", ["hetlora", "ffa_lora", "fedsa_lora", "atlas_no_laplacian"])
def test_every_rule_with_a_group_average_takes_the_step(make_config, tmp_path, method):
    plain = _run(make_config, tmp_path, "plain", method=method)
    avgm = _run(make_config, tmp_path, "avgm", method=method, server_optimizer="avgm", server_lr=0.5)
    assert set(_digests(avgm)[1].values()).isdisjoint(_digests(plain)[1].values())
    assert avgm["communication_costs"]["total_bytes_up"] == plain["communication_costs"]["total_bytes_up"]
