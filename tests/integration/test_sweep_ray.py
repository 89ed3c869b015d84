"""`atlas sweep --ray-address`: the grid's runs as tasks on a Ray cluster (a real one, started on loopback), under
the same loop as `--jobs`: a failed run does not stop the others, a re-run skips what finished."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from atlasfl.cli.app import main
from atlasfl.experiment import is_complete
from tests.integration.test_sweep import SMALL

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster on loopback with two CPUs, in its own process group (stopped by killing that group,
    not by `ray stop`, which would stop every Ray instance of this user, a Flower simulation's too)."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are bounded
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
    yield address
    import ray

    ray.shutdown()
    os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def test_runs_are_ray_tasks_a_failure_stays_alone_and_a_rerun_skips_them(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--models", "no-such-model", "tiny-bert", "--methods", "local_only", "--seeds", "0", *SMALL,
            "--jobs", "2", "--ray-address", ray_cluster]
    assert main(args) == 1
    done = tmp_path / "results" / "atlas_tiny-bert_local_only_seed0_r1.json"
    assert is_complete(done)
    out = capsys.readouterr().out
    assert f"on Ray at {ray_cluster}" in out
    summary = out.split("sweep: 2 runs:")[1]
    assert "1 ran, 0 already complete, 1 failed" in summary
    assert "FAILED atlas_no-such-model_local_only_seed0_r1: atlas: error: unknown model 'no-such-model'" in summary
    assert "final test metrics" in (tmp_path / "logs" / "sweep" / "atlas_tiny-bert_local_only_seed0_r1.out").read_text()

    mtime = done.stat().st_mtime_ns
    assert main(args) == 1
    assert "0 ran, 1 already complete, 1 failed" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == mtime


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--models", "tiny-bert", "--methods", "local_only", "--seeds", "0", *SMALL,
                 "--ray-address", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach the Ray cluster" in err and "ray start --head" in err
