"""`atlas tune`: a seeded Optuna study whose trials are federations scored on local validation only; it lives in a
SQLite file and continues when run again; its best settings are a config file `atlas run` takes."""
from __future__ import annotations

import dataclasses
import json
import tomllib

import numpy as np
import pytest

from atlasfl.cli.app import main
from atlasfl.engines import inprocess
from atlasfl.tuning import study_plan
from atlasfl.tuning.study import run_study
from tests.conftest import BINARY_TASKS

SMALL = dict(tasks=BINARY_TASKS, clients_per_task=2, rounds=2, max_samples=40, max_test_samples=16, batch_size=8,
             fingerprint_samples=8, representation_samples=8)
FLAGS = ["--tasks", *BINARY_TASKS, "--clients-per-task", "2", "--max-samples", "40",
         "--max-test-samples", "16", "--batch-size", "8", "--fingerprint-samples", "8", "--representation-samples", "8"]


def plan(tmp_path, trials, folder="a", **kw):
    dirs = {k: str(tmp_path / folder / k) for k in ("output_dir", "log_dir", "checkpoint_dir")}
    return study_plan("tiny-bert", 7, "fedprox", trials, **SMALL, **dirs, **kw)


def trials_of(study):
    return [(t.number, t.state.name, t.params, t.value, dict(t.intermediate_values)) for t in study.trials]


def test_the_study_is_seeded_and_continues_where_it_stopped(tmp_path):
    first = trials_of(run_study(plan(tmp_path, 2, "a"), say=lambda _: None))
    assert trials_of(run_study(plan(tmp_path, 2, "b"), say=lambda _: None)) == first  # same command, same trials
    assert first[0][2] == {"lr": 1e-3, "local_epochs": 1, "prox_mu": 0.01}  # trial 0: the untuned settings
    assert len({str(t[2]) for t in first}) == 2 and all(sorted(t[4]) == [1, 2] for t in first)

    continued = trials_of(run_study(plan(tmp_path, 3, "a"), say=lambda _: None))  # same storage: one more trial
    assert continued[:2] == first and len(continued) == 3
    assert trials_of(run_study(plan(tmp_path, 3, "c"), say=lambda _: None)) == continued  # as if never stopped


def test_a_study_on_permuted_test_labels_gives_the_same_trials(tmp_path, monkeypatch):
    clean = trials_of(run_study(plan(tmp_path, 2, "clean"), say=lambda _: None))
    real, permuted = inprocess.load_task, []

    def load_permuted(name, **kw):
        task = real(name, **kw)
        labels = [ex.label for ex in task.test]
        shifted = [(y + 1) % task.num_labels for y in labels]  # every test label wrong
        permuted.append(name)
        return dataclasses.replace(task, test=[dataclasses.replace(ex, label=y) for ex, y in zip(task.test, shifted)])

    monkeypatch.setattr(inprocess, "load_task", load_permuted)
    assert trials_of(run_study(plan(tmp_path, 2, "permuted"), say=lambda _: None)) == clean
    assert sorted(set(permuted)) == sorted(BINARY_TASKS)


def test_a_study_made_with_other_settings_is_refused(tmp_path):
    run_study(plan(tmp_path, 1, "a"), say=lambda _: None)
    with pytest.raises(Exception, match="made with other settings or ranges .*lora_dropout"):
        run_study(plan(tmp_path, 1, "a", lora_dropout=0.0), say=lambda _: None)  # same name, other study


def test_cli_writes_best_settings_that_atlas_run_takes_and_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.toml"
    space.write_text("rounds = 1\n[search_space]\nlr = [1e-3, 1e-2]\n")
    assert main(["tune", "tiny-bert", "atlas", "--trials", "2", "--config", str(space), *FLAGS,
                 "--local-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "searching lr, eta" in out and "2 of 2 trials finished" in out
    folder = tmp_path / "results" / "tuning" / "atlas_tiny-bert_atlas_seed7_r1_tune"
    best = tomllib.loads((folder / "best.toml").read_text())
    assert 1e-3 <= best["lr"] <= 1e-2 and best["rounds"] == 1 and best["seed"] == 7 and best["local_epochs"] == 1
    assert (folder / "history.png").stat().st_size > 0

    assert main(["run", "--config", str(folder / "best.toml")]) == 0
    import optuna

    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder}.db")
    (result,) = (tmp_path / "results").glob("*.json")
    per_client = json.loads(result.read_text())["final_metrics"]["per_client"].values()
    assert np.mean([m["val_score"] for m in per_client]) == study.best_value  # the best trial, run again
