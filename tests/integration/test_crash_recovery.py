"""Nothing is lost on a crash: a sweep with `--jobs` and a tuning study killed with SIGKILL mid-run continue when
the same command runs again; finished runs and trials are kept, the interrupted ones resume from their
checkpoints. The processes are real (a child killed with its whole process group), the waits polled."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasfl.cli.app import main
from atlasfl.experiment import is_complete
from atlasfl.results.checkpoint import complete_checkpoints
from atlasfl.tuning import study as tuning_study
from tests.integration.test_tune import FLAGS

pytestmark = pytest.mark.e2e

SWEEP = ["sweep", "--models", "tiny-bert", "--methods", "local_only", "fedavg_cluster", "--seeds", "0",
         "--tasks", "gen_sentiment", "gen_pair", "--clients-per-task", "2", "--rounds", "4", "--max-samples", "16",
         "--max-test-samples", "8", "--batch-size", "8", "--fingerprint-samples", "8", "--jobs", "2"]
CLI = "import sys; from atlasfl.cli.app import main; sys.exit(main(sys.argv[1:]))"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """The command in its own process group, as a shell would start it."""
    return subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    """SIGKILL the process and its children once `ready()` holds (polled)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the command ended before it could be killed mid-run"
        assert time.monotonic() < deadline, "the command never reached the point to kill it at"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_sweep_killed_mid_run_continues_on_the_same_command(tmp_path, monkeypatch, capsys):
    runs = {m: f"atlas_tiny-bert_{m}_seed0_r4" for m in ("local_only", "fedavg_cluster")}
    results = {m: tmp_path / "results" / f"{name}.json" for m, name in runs.items()}
    checkpoints = {m: tmp_path / "checkpoints" / name for m, name in runs.items()}

    def mid_run() -> bool:  # some run holds a checkpoint after round 1 and has not finished
        return any(not is_complete(results[m]) and any(p.name.endswith(("0001", "0002", "0003"))
                                                       for p in complete_checkpoints(checkpoints[m])) for m in runs)

    _kill_when(_start(SWEEP, tmp_path), mid_run)
    interrupted = [m for m in runs if not is_complete(results[m]) and complete_checkpoints(checkpoints[m])]
    finished = {m: results[m].stat().st_mtime_ns for m in runs if is_complete(results[m])}
    assert interrupted

    monkeypatch.chdir(tmp_path)
    assert main(SWEEP) == 0
    assert all(is_complete(p) for p in results.values())
    assert {m: results[m].stat().st_mtime_ns for m in finished} == finished  # kept, not run again
    for m in interrupted:
        log = (tmp_path / "logs" / "sweep" / f"{runs[m]}.out").read_text()
        assert f"resuming {runs[m]} from round" in log


def test_a_study_killed_mid_trial_keeps_its_trials_and_resumes_the_dead_one(tmp_path, monkeypatch, capsys):
    import optuna

    args = ["tune", "tiny-bert", "fedavg_cluster", "--trials", "2", "--rounds", "4", *FLAGS]
    name = "atlas_tiny-bert_fedavg_cluster_seed7_r4_tune2"
    storage = f"sqlite:///{tmp_path / 'results' / 'tuning' / name}.db"
    trial1 = tmp_path / "checkpoints" / name / "trial1" / "atlas_tiny-bert_fedavg_cluster_seed7_r4"

    def trial_one_mid_run() -> bool:
        return any(p.name.endswith(("0001", "0002", "0003")) for p in complete_checkpoints(trial1))

    _kill_when(_start(args, tmp_path), trial_one_mid_run)
    before = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]  # the dead trial cannot say it died

    # A dead trial is told from a live one (another process of the same study) by its heartbeat going stale.
    monkeypatch.setattr(tuning_study, "GRACE_S", 1)
    time.sleep(2)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    after = optuna.load_study(study_name=name, storage=storage).trials
    assert after[0].value == before[0].value and after[0].params == before[0].params  # kept
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE"]
    retry = after[2]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 1
    assert retry.params == after[1].params
    # the retry continued the dead trial's federation from its checkpoint
    assert "resuming atlas_tiny-bert_fedavg_cluster_seed7_r4 from round" in capsys.readouterr().err
