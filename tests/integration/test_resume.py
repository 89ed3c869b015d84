"""Long runs that survive: kill -9, an interrupted checkpoint write, SIGINT; resume equals uninterrupted."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import atlasfl.results.checkpoint as ckpt
from atlasfl.experiment import run_and_save
from atlasfl.results.checkpoint import complete_checkpoints
from tests.conftest import comparable as _comparable

ROUNDS = 5
ARGS = ["tiny-bert", "3", "atlas", "--tasks", "gen_sentiment", "--tasks", "gen_pair", "--clients-per-task", "2",
        "--rounds", str(ROUNDS), "--max-samples", "160", "--max-test-samples", "32", "--batch-size", "8",
        "--fingerprint-samples", "16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process."""
    from atlasfl.cli.app import main

    d = tmp_path_factory.mktemp("reference")
    assert main(["run", *ARGS, "--output-dir", str(d), "--checkpoint-dir", str(d / "ck")]) == 0
    return _comparable(json.loads(next(d.glob("*.json")).read_text()))


def _start(tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "atlasfl.cli", "run", *ARGS, "--output-dir", str(tmp_path / "results"),
           "--checkpoint-dir", str(tmp_path / "ck")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # the same thread count as the tests: same sums
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_round(tmp_path: Path, proc: subprocess.Popen, round_idx: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.name for p in complete_checkpoints(tmp_path / "ck" / run_name())]
        if any(int(n.rsplit("-", 1)[1]) >= round_idx for n in names):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never reached the round")


def run_name() -> str:
    return f"atlas_tiny-bert_atlas_seed3_r{ROUNDS}"


def _resume(tmp_path: Path) -> dict:
    from atlasfl.cli.app import main

    code = main(["run", *ARGS, "--output-dir", str(tmp_path / "results"), "--checkpoint-dir", str(tmp_path / "ck"),
                 "--resume"])
    assert code == 0
    return _comparable(json.loads((tmp_path / "results" / f"{run_name()}.json").read_text()))


def test_kill_9_after_round_2_then_resume_gives_the_uninterrupted_result(tmp_path, reference):
    proc = _start(tmp_path)
    _wait_for_round(tmp_path, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "results" / f"{run_name()}.json").exists()
    # pruned to the last two; a kill between a new checkpoint's rename and the pruning leaves one more (nothing lost)
    assert len(complete_checkpoints(tmp_path / "ck" / run_name())) <= 3
    assert _resume(tmp_path) == reference
    assert len(complete_checkpoints(tmp_path / "ck" / run_name())) <= 2  # the resumed run prunes again


def test_sigint_writes_checkpoint_prints_resume_command_and_exits_nonzero(tmp_path, reference):
    proc = _start(tmp_path)
    _wait_for_round(tmp_path, proc, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "interrupted" in err and "Traceback" not in err
    assert complete_checkpoints(tmp_path / "ck" / run_name())
    assert _resume(tmp_path) == reference


def test_a_checkpoint_write_cut_short_leaves_the_previous_one_and_resume_is_exact(tmp_path, reference, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def dying_writer(tensors, filename):
        calls["n"] += 1
        if calls["n"] == 4:  # round 3's checkpoint (round 0 is the plan): write half a file, then die
            Path(filename).write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", dying_writer)
    from atlasfl.config import build_config

    cfg = build_config(*ARGS[:2], ARGS[2], tasks=("gen_sentiment", "gen_pair"), clients_per_task=2, rounds=ROUNDS,
                       max_samples=160, max_test_samples=32, batch_size=8, fingerprint_samples=16,
                       output_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(KeyboardInterrupt):
        run_and_save(cfg, progress=False)
    folder = tmp_path / "ck" / run_name()
    assert [p.name for p in complete_checkpoints(folder)][-1].endswith("-0002")
    assert not [p for p in folder.iterdir() if "tmp" in p.name]  # the half-written folder is gone
    monkeypatch.setattr(ckpt, "save_file", real)
    assert _resume(tmp_path) == reference


def test_an_interrupted_demo_continues_where_it_stopped_and_a_finished_one_prints_without_training(
        tmp_path, reference, monkeypatch, capsys):
    import atlasfl.demo
    from atlasfl.cli import run as cli_run

    monkeypatch.setattr(atlasfl.demo, "DEMO", dict(
        model="tiny-bert", seed=3, tasks=("gen_sentiment", "gen_pair"), clients_per_task=2, rounds=ROUNDS,
        max_samples=160, max_test_samples=32, batch_size=8, fingerprint_samples=16,
        checkpoint_dir=str(tmp_path / "ck")))
    monkeypatch.setattr(atlasfl.demo, "DEMO_METHODS", {"fedavg_cluster": {}, "atlas": {}})
    real, writes, stop = ckpt.save_file, [], [ROUNDS + 1 + 4]  # fedavg_cluster's plan and rounds, atlas's 0-3

    def counting_writer(tensors, filename):
        writes.append(filename)
        if stop and len(writes) == stop[0]:
            stop.clear()
            raise KeyboardInterrupt  # stopped while writing atlas's round 3, once
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", counting_writer)
    with pytest.raises(KeyboardInterrupt):
        cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=False)
    writes.clear()
    cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=False)
    assert len(writes) == 3  # atlas's rounds 3, 4 and 5 only: fedavg_cluster was read back, atlas continued
    assert _comparable(json.loads((tmp_path / "results" / f"{run_name()}.json").read_text())) == reference
    capsys.readouterr()
    writes.clear()
    cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=False)
    out, err = capsys.readouterr()
    assert not writes and err.count("finished earlier, read back") == 2  # nothing trained
    assert "fedavg_cluster" in out and "atlas (η=0.1)" in out and "task mean" in out and "atlas report" in out
    cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=True)
    assert len(writes) == 2 * (ROUNDS + 1)  # --overwrite: both trained afresh, plan and every round
    # An older demo (other settings) stopped mid-run: the new demo sets its checkpoint aside and trains afresh.
    shutil.rmtree(tmp_path / "results")
    new = atlasfl.demo.DEMO
    monkeypatch.setattr(atlasfl.demo, "DEMO", dict(new, lr=5e-3))
    writes.clear()
    stop.append(2)  # fedavg_cluster's round 1
    with pytest.raises(KeyboardInterrupt):
        cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=False)
    monkeypatch.setattr(atlasfl.demo, "DEMO", new)
    writes.clear()
    capsys.readouterr()
    cli_run.demo(output_dir=str(tmp_path / "results"), overwrite=False)
    err = capsys.readouterr().err
    assert len(writes) == ROUNDS + 1  # fedavg_cluster afresh; atlas takes its own finished run's last checkpoint
    assert "fedavg_cluster_seed3_r5: training afresh (its checkpoint was made with a different config (lr differ)" \
        in err and f"resuming {run_name()} from round {ROUNDS}" in err


def test_resume_refuses_a_different_config_an_older_format_and_a_corrupt_checkpoint(tmp_path, capsys):
    from atlasfl.cli.app import main

    base = ["run", *ARGS, "--output-dir", str(tmp_path / "results"), "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(base) == 0
    (tmp_path / "results" / f"{run_name()}.json").unlink()
    capsys.readouterr()
    assert main([*base, "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr" in err and "different config" in err
    newest = complete_checkpoints(tmp_path / "ck" / run_name())[-1]
    meta = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "earlier version of ATLAS (format 1" in err and "without --resume" in err
    # An older version's checkpoint lacks the options added since: at their defaults they do not differ.
    older = dict(meta, config={k: v for k, v in meta["config"].items() if k != "eval_every"})
    (newest / "state.json").write_text(json.dumps(older))
    assert main([*base, "--resume", "--eval-every", "2"]) == 2
    assert "(eval_every differ)" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    assert f"resuming {run_name()}" in capsys.readouterr().err
    (tmp_path / "results" / f"{run_name()}.json").unlink()
    (newest / "state.json").write_text(json.dumps(meta))
    data = (newest / "states.safetensors").read_bytes()
    (newest / "states.safetensors").write_bytes(data[: len(data) // 2])
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt or truncated" in err and "Traceback" not in err
    assert not (tmp_path / "results" / f"{run_name()}.json").exists()


def test_resume_without_checkpoint_starts_over_with_a_notice(tmp_path, capsys, reference):
    assert _resume(tmp_path) == reference
    assert "starting from the beginning" in capsys.readouterr().err
