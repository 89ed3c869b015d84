"""`atlas sweep`: resumes a partly finished grid, lists failed runs at the end with a non-zero exit."""
from __future__ import annotations

import pytest

import atlasfl.sweep
from atlasfl.cli.app import main
from atlasfl.cli.options import spread_list_options
from atlasfl.experiment import is_complete

SMALL = ["--tasks", "gen_sentiment", "gen_pair", "--clients-per-task", "2", "--rounds", "1", "--max-samples", "16",
         "--max-test-samples", "8", "--batch-size", "8", "--fingerprint-samples", "8"]


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """Run names that really ran, in order; logs/ lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    ran = []
    real = atlasfl.sweep.run_and_save

    def recording(cfg, **kw):
        ran.append(cfg.run_name)
        return real(cfg, **kw)

    monkeypatch.setattr(atlasfl.sweep, "run_and_save", recording)
    return ran


def test_resume_runs_only_what_is_missing(tmp_path, runs, capsys):
    out = tmp_path / "results"
    args = ["sweep", "--models", "tiny-bert", "--methods", "local_only", "--seeds", "0", "1", *SMALL,
            "--output-dir", str(out)]
    assert main(args) == 0
    kept, deleted = out / "atlas_tiny-bert_local_only_seed0_r1.json", out / "atlas_tiny-bert_local_only_seed1_r1.json"
    assert is_complete(kept) and is_complete(deleted)
    assert runs == [kept.stem, deleted.stem]
    mtime = kept.stat().st_mtime_ns
    deleted.unlink()
    runs.clear()
    capsys.readouterr()

    assert main(args) == 0
    assert runs == [deleted.stem]
    assert kept.stat().st_mtime_ns == mtime and is_complete(deleted)
    printed = capsys.readouterr().out
    assert f"[1/2] {kept.stem}: complete, skipped" in printed
    assert f"[2/2] {deleted.stem}: running" in printed
    assert "1 ran, 1 already complete, 0 failed" in printed


def test_failed_run_is_listed_and_the_rest_complete(tmp_path, runs, capsys):
    out = tmp_path / "results"
    code = main(["sweep", "--models", "no-such-model,tiny-bert", "--methods", "local_only", "--seeds", "0", *SMALL,
                 "--output-dir", str(out)])
    assert code == 1
    assert runs == ["atlas_no-such-model_local_only_seed0_r1", "atlas_tiny-bert_local_only_seed0_r1"]
    assert is_complete(out / "atlas_tiny-bert_local_only_seed0_r1.json")
    printed = capsys.readouterr()
    summary = printed.out.split("sweep: 2 runs:")[1]
    assert "1 ran, 0 already complete, 1 failed" in summary
    assert "FAILED atlas_no-such-model_local_only_seed0_r1: unknown model 'no-such-model'" in summary
    assert printed.err.strip().splitlines()[-1] == (
        "atlas: error: 1 of 2 runs failed (listed above); fix them and run the same sweep "
                                   "again: complete runs are skipped")


def test_invalid_grid_is_refused_before_anything_runs(runs, capsys):
    code = main(["sweep", "--models", "tiny-bert", "--methods", "local_only", "no_such_method", "--seeds", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown method 'no_such_method'" in err
    assert runs == []


def test_list_options_take_every_value_up_to_the_next_option():
    args = ["--models", "minilm", "--methods", "atlas", "local_only", "standard_fl", "--seeds", "42", "123",
            "--rounds", "2", "--tasks", "offline", "--overwrite"]
    assert spread_list_options(args, ("--models", "--methods", "--seeds", "--tasks")) == [
        "--models", "minilm", "--methods", "atlas", "--methods", "local_only", "--methods", "standard_fl",
        "--seeds", "42", "--seeds", "123", "--rounds", "2", "--tasks", "offline", "--overwrite"]


def test_run_takes_space_separated_tasks_like_the_seed_and_sweep(capsys, tmp_path, monkeypatch):
    """`atlas run ... --tasks sst2 mrpc cola qnli` (the seed's spelling) reaches the config as four tasks."""
    import atlasfl.cli.run as run_command

    seen = []

    def record(cfg, **kw):
        seen.append(cfg)
        raise RuntimeError("recorded, not run")

    monkeypatch.setattr(run_command, "run_and_save", record)
    main(["run", "tiny-bert", "0", "local_only", "--tasks", "gen_sentiment", "gen_pair", "--rounds", "1",
          "--devices", "cpu_2gb", "gpu_16gb"])
    assert seen[0].tasks == ("gen_sentiment", "gen_pair") and seen[0].devices == ("cpu_2gb", "gpu_16gb")
    assert seen[0].rounds == 1
