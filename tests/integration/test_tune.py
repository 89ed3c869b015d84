"""`atlas tune`: a seeded Optuna study whose trials are federations scored on local validation only; it lives in a
SQLite file and continues when run again; its best settings are a config file `atlas run` takes."""
from __future__ import annotations

import dataclasses
import json
import tomllib

import numpy as np
import pytest

from atlasfl.cli.app import main
from atlasfl.config import build_config
from atlasfl.engines import inprocess
from atlasfl.errors import AtlasError
from atlasfl.report.load import load_results
from atlasfl.tuning import study_plan
from atlasfl.tuning.study import run_study
from tests.conftest import BINARY_TASKS

SMALL = dict(tasks=BINARY_TASKS, clients_per_task=2, rounds=2, max_samples=40, max_test_samples=16, batch_size=8,
             fingerprint_samples=8, representation_samples=8)
FLAGS = ["--tasks", *BINARY_TASKS, "--clients-per-task", "2", "--max-samples", "40",
         "--max-test-samples", "16", "--batch-size", "8", "--fingerprint-samples", "8", "--representation-samples", "8"]


def plan(tmp_path, trials, folder="a", **kw):
    dirs = {k: str(tmp_path / folder / k) for k in ("output_dir", "log_dir", "checkpoint_dir")}
    return study_plan(build_config("tiny-bert", 7, "fedprox", **SMALL, **dirs, **kw), trials)


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
    with pytest.raises(AtlasError, match="made with other settings or ranges .*lora_dropout"):
        run_study(plan(tmp_path, 1, "a", lora_dropout=0.0), say=lambda _: None)  # same name, other study


def test_cli_writes_best_settings_that_atlas_run_takes_and_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.toml"
    space.write_text("rounds = 1\n[search_space]\nlr = [1e-3, 1e-2]\n")
    assert main(["tune", "tiny-bert", "atlas", "--trials", "2", "--config", str(space), *FLAGS,
                 "--local-epochs", "2"]) == 0  # set to other than its default: kept
    out = capsys.readouterr().out
    assert "searching lr, eta" in out and "2 of 2 trials finished" in out
    folder = tmp_path / "results" / "tuning" / "atlas_tiny-bert_atlas_seed7_r1_tune2"
    best = tomllib.loads((folder / "best.toml").read_text())
    assert 1e-3 <= best["lr"] <= 1e-2 and best["rounds"] == 1 and best["seed"] == 7 and best["local_epochs"] == 2
    assert (folder / "history.png").stat().st_size > 0

    assert main(["run", "--config", str(folder / "best.toml")]) == 0
    import optuna

    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder}.db")
    (result,) = (tmp_path / "results").glob("*.json")
    per_client = json.loads(result.read_text())["final_metrics"]["per_client"].values()
    assert np.mean([m["val_score"] for m in per_client]) == study.best_value  # the best trial, run again


def test_run_tune_tunes_on_its_own_clients_then_runs_the_best_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny-bert", "3", "fedprox", "--tune", "2", "--rounds", "1", *FLAGS]) == 0
    result = json.loads((tmp_path / "results" / "atlas_tiny-bert_fedprox_seed3_r1_tune2.json").read_text())
    tuning = result["tuning"]
    assert tuning["seed"] == 3 and tuning["budget"] == dict(trials=2, rounds_per_trial=1, finished=2, pruned=0)
    assert [t["number"] for t in tuning["trials"]] == [0, 1] and tuning["storage"].startswith("sqlite:///")
    assert all(result["config"][k] == v for k, v in tuning["best"]["params"].items())
    per_client = result["final_metrics"]["per_client"].values()
    assert np.mean([m["val_score"] for m in per_client]) == tuning["best"]["val_score"]  # the best trial again
    (record,) = load_results([str(tmp_path / "results")])
    assert record.method_label == "fedprox (tuned ×2)"


def test_sweep_tune_gives_every_method_the_same_trials_on_the_development_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = ["sweep", "--models", "tiny-bert", "--methods", "local_only", "atlas", "--rounds", "1", "--tune", "2",
            *FLAGS]
    assert main([*grid, "--seeds", "0", "1"]) == 0
    results = {p.stem: json.loads(p.read_text())["tuning"] for p in (tmp_path / "results").glob("*.json")}
    assert sorted(results) == [f"atlas_tiny-bert_{m}_seed{s}_r1_tune2" for m in ("atlas", "local_only") for s in (0, 1)]
    for method in ("atlas", "local_only"):
        same = [results[f"atlas_tiny-bert_{method}_seed{s}_r1_tune2"] for s in (0, 1)]
        assert same[0] == same[1] and same[0]["seed"] == 7 and same[0]["budget"]["finished"] == 2
    assert main([*grid, "--seeds", "7"]) == 2
    assert "--tune-seed 7 is also a reported seed" in capsys.readouterr().err
