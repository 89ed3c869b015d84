"""`--tensorboard DIR`: live curves per round, client and task, readable by TensorBoard's own reader,
and the result JSON is the same with or without them."""
from __future__ import annotations

import pytest

from atlasfl.experiment import run_and_save
from tests.conftest import interrupt_at_checkpoint, tiny_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the tensorboard extra is not installed")


def _comparable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("time_metrics", "memory", "config")}
    out["round_metrics"] = [{k: v for k, v in r.items() if k != "time_s"} for r in result["round_metrics"]]
    out["config"] = {k: v for k, v in result["config"].items() if k not in ("tensorboard", "output_dir")}
    return out


def _scalars(folder) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_tensorboard_curves_open_and_match_the_result(tmp_path):
    cfg = tiny_config(tmp_path, method="atlas", rounds=2, tensorboard=str(tmp_path / "tb"))
    result, _ = run_and_save(cfg, progress=False)
    acc = _scalars(tmp_path / "tb" / cfg.run_name)
    tags = set(acc.Tags()["scalars"])
    clients = [f"c{c['client_id']}" for c in result["clients"]]
    expected = {"summary/mean_task_score", "summary/mean_accuracy", "communication/MB_up",
                "communication/MB_down_cumulative", "time/round_s", "time/phase_s/fingerprint",
                *(f"task_score/{t}" for t in result["final_metrics"]["per_task"]),
                *(f"{kind}/{c}" for kind in ("train_loss", "test_loss", "test_score", "test_accuracy")
                  for c in clients)}
    assert expected <= tags, expected - tags
    assert "config/text_summary" in acc.Tags()["tensors"]
    curve = acc.Scalars("summary/mean_task_score")
    assert [e.step for e in curve] == [1, 2]
    assert [e.value for e in curve] == pytest.approx([r["mean_task_score"] for r in result["round_metrics"]],
                                                     rel=1e-6)
    losses = [e.value for e in acc.Scalars("train_loss/c0")]
    assert losses == pytest.approx([r["clients"][0]["train_loss"] for r in result["round_metrics"]], rel=1e-6)
    up = [e.value for e in acc.Scalars("communication/MB_up_cumulative")]
    assert up[-1] == pytest.approx(sum(r["bytes_up_total"] for r in result["round_metrics"]) / 1e6, rel=1e-6)
    # The same run without tracking writes the same result, apart from clocks and the two output settings.
    plain, _ = run_and_save(tiny_config(tmp_path, method="atlas", rounds=2, output_dir=str(tmp_path / "plain")),
                            progress=False)
    assert _comparable(plain) == _comparable(result)


def test_lambda_sweep_writes_one_tensorboard_run_per_eta(tmp_path):
    cfg = tiny_config(tmp_path, method="atlas", rounds=1, lambda_sweep=True, lambda_grid=(0.0, 0.5),
                      tensorboard=str(tmp_path / "tb"))
    run_and_save(cfg, progress=False)
    root = tmp_path / "tb" / cfg.run_name
    assert sorted(p.name for p in root.iterdir()) == ["eta-0", "eta-0.5"]
    for eta in ("eta-0", "eta-0.5"):
        assert [e.step for e in _scalars(root / eta).Scalars("summary/mean_task_score")] == [1]


def test_a_resumed_run_continues_its_curves(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, method="atlas", rounds=3, tensorboard=str(tmp_path / "tb"))
    interrupt_at_checkpoint(cfg, monkeypatch, write=4)  # round 3's: rounds 1 and 2 are logged and saved
    result, _ = run_and_save(cfg, progress=False, resume=True)
    acc = _scalars(tmp_path / "tb" / cfg.run_name)
    curve = acc.Scalars("summary/mean_task_score")
    assert [e.step for e in curve] == [1, 2, 3]
    assert [e.value for e in curve] == pytest.approx([r["mean_task_score"] for r in result["round_metrics"]],
                                                     rel=1e-6)
    sent, total = [], 0.0
    for r in result["round_metrics"]:
        total += r["bytes_up_total"] / 1e6
        sent.append(total)
    assert [e.value for e in acc.Scalars("communication/MB_up_cumulative")] == pytest.approx(sent, rel=1e-6)


def test_a_dp_run_draws_its_epsilon_curve_and_adaptive_clipping_each_groups_clip(tmp_path):
    cfg = tiny_config(tmp_path, method="standard_fl", dp_clip=0.5, dp_noise=1.0, dp_target_quantile=0.5,
                      tensorboard=str(tmp_path / "tb"))
    result, _ = run_and_save(cfg, progress=False)
    scalars = _scalars(tmp_path / "tb" / cfg.run_name)
    curve = scalars.Scalars("privacy/epsilon")
    assert [e.value for e in curve] == pytest.approx([r["privacy"]["epsilon"] for r in result["round_metrics"]],
                                                     rel=1e-6)
    group = ",".join(map(str, range(len(result["clients"]))))  # standard_fl: one group of every client
    clips = [r["privacy"]["clips"][group]["clip"] for r in result["round_metrics"]]
    assert [e.value for e in scalars.Scalars(f"privacy/clip/{group}")] == pytest.approx(clips, rel=1e-6)
