"""Client-level DP end to end on tiny federations: no-noise, no-clip DP is the plain run bit for bit; a noised
run repeats exactly; the budget stops a run cleanly with a result that says so."""
import json
import math

import pytest

from atlasfl.experiment import run_and_save
from atlasfl.phases.privacy import epsilon
from atlasfl.report.load import load_results
from atlasfl.report.tables import build_tables
from atlasfl.results.schema import validate_result
from tests.conftest import interrupt_at_checkpoint


def _digests(result):
    return [r["state_digests"] for r in result["round_metrics"]]


def test_no_clip_no_noise_is_the_plain_run_bit_for_bit(make_config, tmp_path):
    plain, _ = run_and_save(make_config(method="standard_fl", output_dir=str(tmp_path / "a")), progress=False)
    dp, _ = run_and_save(make_config(method="standard_fl", dp_clip=math.inf, dp_noise=0.0,
                                     output_dir=str(tmp_path / "b")),
                         progress=False)
    assert _digests(dp) == _digests(plain)
    assert "privacy" not in plain
    assert dp["privacy"]["epsilon_infinite"] and dp["privacy"]["epsilon"] is None  # no noise: ε = ∞
    assert all(r["privacy"]["epsilon_infinite"] for r in dp["round_metrics"])
    validate_result(dp)


def test_noised_run_repeats_and_reports_the_accountants_epsilon(make_config, tmp_path):
    kw = dict(method="standard_fl", dp_clip=0.5, dp_noise=1.0)
    one, _ = run_and_save(make_config(output_dir=str(tmp_path / "a"), **kw), progress=False)
    two, _ = run_and_save(make_config(output_dir=str(tmp_path / "b"), **kw), progress=False)
    assert _digests(one) == _digests(two)
    clipped, _ = run_and_save(make_config(output_dir=str(tmp_path / "c"), **dict(kw, dp_noise=0.0)), progress=False)
    assert _digests(clipped) != _digests(one)  # the noise was added
    spent = [r["privacy"]["epsilon"] for r in one["round_metrics"]]
    assert spent == [pytest.approx(epsilon(1.0, [1.0] * t, 1e-5)) for t in (1, 2)]
    assert one["privacy"]["epsilon"] == spent[-1] and not one["privacy"]["stopped_by_budget"]
    assert "not covered" in one["privacy"]["phase1_fingerprints"]


def test_budget_stops_before_the_round_that_would_exceed_it(make_config, tmp_path):
    budget = (epsilon(1.0, [1.0], 1e-5) + epsilon(1.0, [1.0] * 2, 1e-5)) / 2  # room for round 1 only
    cfg = make_config(method="fedavg_cluster", dp_clip=0.5, dp_noise=1.0, dp_epsilon_budget=budget, rounds=3)
    result, path = run_and_save(cfg, progress=False)
    assert [r["round"] for r in result["round_metrics"]] == [1]
    assert result["privacy"]["stopped_by_budget"] and result["privacy"]["epsilon"] <= budget
    validate_result(json.loads(path.read_text()))
    assert "_dpcC0.5z1_eps" in path.name  # a DP grid's runs never share a file
    scores = build_tables(load_results([path]), protocols=("global",))[0]
    assert any(row[1].endswith(f"dpcC0.5z1_eps{budget:g})") for row in scores.rows)
    note = next(n for n in scores.notes if n.startswith("DP "))
    assert f"ε = {result['privacy']['epsilon']:.3g}" in note and "without noise" in note and "stopped" in note


def test_a_budget_below_one_round_is_refused(make_config):
    cfg = make_config(method="standard_fl", dp_clip=0.5, dp_noise=1.0, dp_epsilon_budget=0.01)
    with pytest.raises(Exception, match="does not cover one round"):
        run_and_save(cfg, progress=False)


def test_local_mode_noises_each_client_and_accounts_half_the_multiplier(make_config, tmp_path):
    """Local: each client's clipped update gets N(0, (zC)²); one client's release meets z/2 (a replaced shard)."""
    kw = dict(method="fedsa_lora", dp_clip=0.5, dp_noise=2.0)
    local, _ = run_and_save(make_config(output_dir=str(tmp_path / "a"), dp_mode="local", **kw), progress=False)
    central, _ = run_and_save(make_config(output_dir=str(tmp_path / "b"), **kw), progress=False)
    assert _digests(local) != _digests(central)
    assert local["privacy"]["epsilon"] == pytest.approx(epsilon(1.0, [1.0] * 2, 1e-5))
    assert local["privacy"]["effective_noise_multiplier"] == 1.0


@pytest.mark.parametrize("adaptive", [{}, dict(dp_target_quantile=0.5)], ids=["fixed", "adaptive"])
def test_a_resumed_noised_run_draws_the_uninterrupted_noise(make_config, tmp_path, monkeypatch, adaptive):
    """Adaptive: the clips the checkpoint carries are the ones the uninterrupted run went on with."""
    kw = dict(method="standard_fl", dp_clip=0.5, dp_noise=1.0, rounds=3, **adaptive)
    reference, _ = run_and_save(make_config(output_dir=str(tmp_path / "a"), **kw), progress=False)
    cfg = make_config(output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "ck"), **kw)
    interrupt_at_checkpoint(cfg, monkeypatch, write=4)  # round 3's: rounds 1 and 2 are saved
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert _digests(resumed) == _digests(reference)
    assert resumed["privacy"] == reference["privacy"]


@pytest.mark.parametrize("mode, adaptive", [("central", dict(dp_target_quantile=0.5)), ("local", {})])
def test_flower_clients_clip_and_noise_as_the_inprocess_engine(make_config, tmp_path, mode, adaptive):
    """Central with adaptive clipping: the server sends each client its clip, the client says whether it clipped."""
    kw = dict(method="standard_fl", dp_clip=0.5, dp_noise=1.0, dp_mode=mode, **adaptive)
    inproc, _ = run_and_save(make_config(output_dir=str(tmp_path / "a"), **kw), progress=False)
    flower, _ = run_and_save(make_config(output_dir=str(tmp_path / "b"), engine="flower", **kw), progress=False)
    assert _digests(flower) == _digests(inproc)
    assert flower["privacy"] == inproc["privacy"]


def test_adaptive_clipping_moves_each_groups_clip_and_spends_the_same_epsilon(make_config, tmp_path):
    """The clip starts at C and follows the noised unclipped fraction round by round; the combined release is
    accounted at z, so ε is the fixed clip's; the noise met by the update is z_Δ > z."""
    kw = dict(method="fedavg_cluster", dp_clip=0.05, dp_noise=1.0, rounds=3)
    fixed, _ = run_and_save(make_config(output_dir=str(tmp_path / "a"), **kw), progress=False)
    adaptive, path = run_and_save(make_config(output_dir=str(tmp_path / "b"), dp_target_quantile=0.5, **kw),
                                  progress=False)
    validate_result(json.loads(path.read_text()))
    assert "dpcC0.05z1q0.5" in path.name
    rounds = [r["privacy"]["clips"] for r in adaptive["round_metrics"]]
    groups = {",".join(map(str, [c for c, k in enumerate(adaptive["cluster_labels"]) if k == g]))
              for g in set(adaptive["cluster_labels"])}
    assert all(set(clips) == groups for clips in rounds)
    for name in groups:
        assert rounds[0][name]["clip"] == 0.05
        for before, after in zip(rounds, rounds[1:]):
            assert after[name]["clip"] == before[name]["next_clip"]
            assert before[name]["next_clip"] == pytest.approx(
                before[name]["clip"] * math.exp(-0.2 * (before[name]["within_fraction"] - 0.5)))
        assert rounds[-1][name]["next_clip"] != 0.05  # it moved
        assert all(r[name]["update_noise_multiplier"] > 1.0 for r in rounds)
    assert [r["privacy"]["epsilon"] for r in adaptive["round_metrics"]] == \
        [r["privacy"]["epsilon"] for r in fixed["round_metrics"]]
    assert _digests(adaptive)[0] != _digests(fixed)[0]  # round 1 already meets more noise (z_Δ)
    assert adaptive["privacy"]["adaptive_clipping"]["target_quantile"] == 0.5
    assert fixed["privacy"]["adaptive_clipping"] is None and "clips" not in fixed["round_metrics"][0]["privacy"]
