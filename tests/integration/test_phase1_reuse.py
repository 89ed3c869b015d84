"""Runs in one process that differ only in their method take phase 1's fingerprints again instead of
computing them, and end exactly as if they had computed them."""
from __future__ import annotations

import atlasfl.engines.inprocess as inprocess
from atlasfl.engines.inprocess import run_experiment
from tests.conftest import comparable, tiny_config


def counting_fingerprints(monkeypatch) -> list:
    calls, real = [], inprocess.fingerprint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inprocess, "fingerprint", counted)
    return calls


def test_a_method_after_another_takes_phase_1_again_and_ends_as_if_it_had_computed_it(tmp_path, monkeypatch):
    computed = run_experiment(tiny_config(tmp_path / "alone", method="atlas"), progress=False)
    inprocess._last_phase1.clear()
    calls = counting_fingerprints(monkeypatch)
    run_experiment(tiny_config(tmp_path / "first", method="fedavg_cluster"), progress=False)
    clients = len(calls)
    reused = run_experiment(tiny_config(tmp_path / "second", method="atlas", eta=0.5), progress=False)
    assert clients == 4 and len(calls) == clients  # the second run fingerprinted no client
    assert "taken again" in reused["time_metrics"]["clock_note"]
    again = run_experiment(tiny_config(tmp_path / "eta", method="atlas"), progress=False)
    assert comparable(again) == comparable(computed)


def test_another_seed_or_data_setting_computes_phase_1_afresh(tmp_path, monkeypatch):
    calls = counting_fingerprints(monkeypatch)
    run_experiment(tiny_config(tmp_path / "a"), progress=False)
    run_experiment(tiny_config(tmp_path / "b", seed=1), progress=False)
    run_experiment(tiny_config(tmp_path / "c", seed=1, max_samples=20), progress=False)
    assert len(calls) == 3 * 4
