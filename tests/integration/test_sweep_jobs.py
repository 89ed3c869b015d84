"""`atlas sweep --jobs N`: runs as processes at once, one log each; a failed run does not stop the others and a
re-run skips what finished."""
from __future__ import annotations

from atlasfl.cli.app import main
from atlasfl.experiment import is_complete
from atlasfl.jobs import plan_jobs
from tests.conftest import tiny_config
from tests.integration.test_sweep import SMALL


def test_two_jobs_one_failing_run_the_rest_and_a_rerun_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--models", "no-such-model", "tiny-bert", "--methods", "local_only", "--seeds", "0", *SMALL,
            "--jobs", "2"]
    assert main(args) == 1
    done = [tmp_path / "results" / "atlas_tiny-bert_local_only_seed0_r1.json"]
    assert all(map(is_complete, done))
    summary = capsys.readouterr().out.split("sweep: 2 runs:")[1]
    assert "1 ran, 0 already complete, 1 failed" in summary
    assert "FAILED atlas_no-such-model_local_only_seed0_r1: atlas: error: unknown model 'no-such-model'" in summary
    log = tmp_path / "logs" / "sweep" / "atlas_tiny-bert_local_only_seed0_r1.out"
    assert "final test metrics" in log.read_text()

    mtimes = [p.stat().st_mtime_ns for p in done]
    assert main(args) == 1
    assert "0 ran, 1 already complete, 1 failed" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in done] == mtimes


def test_a_tuned_method_runs_its_study_once_before_its_other_seeds(tmp_path):
    configs = [tiny_config(tmp_path, method=m, seed=s, tune=2, tune_seed=7) for m in ("fedprox", "atlas")
               for s in (0, 1)]
    assert [j.after for j in plan_jobs(configs)] == [None, configs[0].run_name, None, configs[2].run_name]
    assert all(j.after is None for j in plan_jobs([tiny_config(tmp_path, seed=s) for s in (0, 1)]))
