"""A real Flower federation on loopback: one `flower-superlink`, four `flower-supernode`s (one client
each, its shard chosen by its node config), then `flwr run` of `fedavg_cluster` and of `atlas`.

Every process is started by this test in its own session, on 127.0.0.1 and free ports, under one
hard deadline, and killed in `finally` together with everything it spawned (Flower's SuperExec
and the per-message `flwr-clientapp`/`flwr-serverapp` processes)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasfl.results.schema import validate_result

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 300
CLIENTS = 4  # two tasks x two clients
RUN = dict(model="tiny-bert", mode="quick", tasks="gen_sentiment gen_pair", rounds=1)
OVERRIDES = dict(clients_per_task=2, max_samples=24, max_test_samples=16, batch_size=8, fingerprint_samples=8)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to tear processes down")]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(roots: list[int]) -> set[int]:
    tree, seen, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += tree.get(pid, [])
    return seen


def _teardown(procs: list[subprocess.Popen]) -> set[int]:
    """SIGTERM, then SIGKILL, every started process and all it spawned; returns any survivors."""
    pids = _descendants([p.pid for p in procs])  # before killing: orphans would lose their parent link
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {pid for pid in pids | _descendants([p.pid for p in procs]) if _alive(pid)}
        if not pids:
            break
    return pids


def _wait_for_port(port: int, until: float) -> None:
    while time.monotonic() < until:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(folder.glob("*.log")))


def test_loopback_federation_runs_fedavg_cluster_and_atlas(tmp_path):
    start = time.monotonic()
    until = start + DEADLINE_S
    link_port, *node_ports = _free_ports(1 + CLIENTS)
    home, out, logs = tmp_path / "flwr-home", tmp_path / "results", tmp_path / "logs"
    for d in (home, out, logs):
        d.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    log_files = []

    def launch(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        log_files.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)
        procs.append(proc)
        return proc

    results = {}
    try:
        launch("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
               "--disable-runtime-dependency-installation")
        _wait_for_port(link_port, until)
        for i, port in enumerate(node_ports):
            launch(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                   "--host", "127.0.0.1", "--port", str(port),
                   "--node-config", f"partition-id={i} num-partitions={CLIENTS}")
        runs = {}
        for method in ("fedavg_cluster", "atlas"):  # submitted together: the SuperNodes serve both runs
            config = {**RUN, "method": method, "output-dir": str(out),
                      **{k.replace("_", "-"): v for k, v in OVERRIDES.items()}}
            run_config = tmp_path / f"{method}.toml"  # a TOML file: no quoting of JSON inside a shell string
            run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
            runs[method] = launch(f"flwr-run-{method}", "flwr", "run", str(REPO), "loopback", "--run-config",
                                  str(run_config), "--stream")
        for method, run in runs.items():
            try:
                run.wait(timeout=max(until - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{method} did not finish within {DEADLINE_S}s\n{_logs(logs)}")
            path = out / f"atlas_tiny-bert_{method}_seed0_r1.json"
            assert run.returncode == 0 and path.exists(), f"{method} wrote no result\n{_logs(logs)}"
            results[method] = json.loads(path.read_text())
    finally:
        survivors = _teardown(procs)
        for log in log_files:
            log.close()
    assert not survivors, f"processes left running: {sorted(survivors)}"

    for method, result in results.items():
        validate_result(result)
        assert result["config"]["engine"] == "flower" and result["method"] == method
        assert [c["client_id"] for c in result["clients"]] == list(range(CLIENTS))
        transport = result["communication_costs"]["transport"]
        assert transport["rounds_payload_matches_accounting"] is True
    shared = results["fedavg_cluster"]
    labels, digests = shared["cluster_labels"], shared["round_metrics"][0]["state_digests"]
    for i in range(CLIENTS):
        for j in range(CLIENTS):
            assert (digests[str(i)] == digests[str(j)]) == (labels[i] == labels[j])
    assert len(set(results["atlas"]["round_metrics"][0]["state_digests"].values())) == CLIENTS  # personalised
    assert time.monotonic() - start < DEADLINE_S + 30
