"""A real Flower federation on loopback: one `flower-superlink`, four `flower-supernode`s (one client
each, its shard chosen by its node config), then `flwr run` of `fedavg_cluster` and of `atlas`; and the same
deployment with TLS (a CA and server certificate made here) and SuperNode authentication (registered keys),
which refuses a SuperNode whose key is not registered and one that speaks plaintext.

Every process is started by this test in its own session, on 127.0.0.1 and free ports, under one
hard deadline, and killed in `finally` together with everything it spawned (Flower's SuperExec
and the per-message `flwr-clientapp`/`flwr-serverapp` processes); the ClientApp's resident workers
(`engines.flower.resident`) must then exit by themselves, their SuperNode gone."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atlasfl.engines.flower.resident import DIR_VAR
from atlasfl.results.schema import validate_result

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 300
_EXITED = re.compile(r"exits after (\d+) messages")  # a resident worker's last log line
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


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(folder: Path) -> None:
    """`ca.crt`, and `server.pem`/`server.key` signed by it for 127.0.0.1 and localhost: what a SuperLink
    serves TLS with and what SuperNodes and `flwr` verify it by (valid for a day)."""
    now = datetime.now(UTC)

    def cert(subject: str, key, issuer: x509.Name, signer, ca: bool, names: list[x509.GeneralName]):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("atlas test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlas test CA")]),
              ca_key, True, [])
    server = cert("localhost", server_key, ca.subject, ca_key, False,
                  [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))])
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(_pem(server_key))


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH form, as `flower-supernode --auth-supernode-private-key` and
    `flwr supernode register` read them (`ssh-keygen -t ecdsa -b 384` makes the same)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


class Loopback:
    """One SuperLink and its SuperNodes on 127.0.0.1 and free ports, a `flwr run` per submitted run, all under
    one deadline; leaving the `with` block tears every started process down and checks none survived.
    `secure`: the SuperLink serves TLS and admits only SuperNodes whose key was registered (`node` registers
    one per client), as docs/flower.md's deployment guide starts it."""

    def __init__(self, tmp_path: Path, deadline_s: float, spare_ports: int = 0, secure: bool = False):
        self.tmp, self.deadline_s, self.secure = tmp_path, deadline_s, secure
        self.until = time.monotonic() + deadline_s
        self.link_port, *self.node_ports = _free_ports(1 + CLIENTS + spare_ports)
        home, self.out, self.logs = tmp_path / "flwr-home", tmp_path / "results", tmp_path / "logs"
        for d in (home, self.out, self.logs):
            d.mkdir()
        self.resident = Path(tempfile.mkdtemp(prefix="atlasfl-"))  # short: it holds Unix sockets
        self.certs = tmp_path / "certs"
        self.certs.mkdir()
        if secure:
            make_certificates(self.certs)
        trust = f'root-certificates = "{self.certs / "ca.crt"}"' if secure else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.link_port}"\n{trust}\n')
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
                        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1",
                        **{DIR_VAR: str(self.resident)})
        self.procs: list[subprocess.Popen] = []
        self.log_files = []

    def __enter__(self) -> Loopback:
        try:
            tls = (["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
                   if self.secure else ["--insecure"])
            self.launch("superlink", "flower-superlink", *tls, "--host", "127.0.0.1", "--port",
                        str(self.link_port), "--disable-runtime-dependency-installation")
            _wait_for_port(self.link_port, self.until)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        survivors = _teardown(self.procs)
        for log in self.log_files:
            log.close()
        self.worker_logs = self._resident_worker_logs()
        shutil.rmtree(self.resident, ignore_errors=True)
        if exc[0] is None:
            assert not survivors, f"processes left running: {sorted(survivors)}"
            assert None not in self.served, f"resident workers left running: {self.served}"

    def _resident_worker_logs(self, within_s: float = 15) -> list[str]:
        """Every resident worker's log, once all have exited (or `within_s` has passed)."""
        deadline = time.monotonic() + within_s
        while True:
            logs = [log.read_text() for log in sorted(self.resident.glob("*.log"))]
            if all(_EXITED.search(log) for log in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.3)

    @property
    def served(self) -> list[int | None]:
        """How many messages each resident worker served (None: it had not exited)."""
        return [int(m.group(1)) if (m := _EXITED.search(log)) else None for log in self.worker_logs]

    def launch(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        self.log_files.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def register(self, name: str) -> Path:
        """A new key pair for a SuperNode, its public key registered with the SuperLink; its private key."""
        private, public = make_supernode_key(self.certs, name)
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "loopback"],
                              env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=max(self.until - time.monotonic(), 1))
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr
        return private

    def node(self, i: int, port: int, node_config: str = "", *trust: str) -> subprocess.Popen:
        """SuperNode `i` (client i); `trust` replaces how it reaches the SuperLink (default: `--insecure`, or
        the CA certificate and a newly registered key when secure)."""
        if not trust:
            trust = (("--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key",
                      str(self.register(f"supernode{i}-{port}"))) if self.secure else ("--insecure",))
        return self.launch(f"supernode{i}-{port}", "flower-supernode", *trust, "--superlink",
                           f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port),
                           "--node-config", f"partition-id={i} num-partitions={CLIENTS} {node_config}".strip())

    def submit(self, name: str, **config) -> subprocess.Popen:
        """`flwr run` of RUN and OVERRIDES with `config` on top, written as a TOML file (no quoting of JSON
        inside a shell string)."""
        config = {**RUN, "output-dir": str(self.out), **{k.replace("_", "-"): v for k, v in OVERRIDES.items()},
                  **config}
        run_config = self.tmp / f"{name}.toml"
        run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return self.launch(f"flwr-run-{name}", "flwr", "run", str(REPO), "loopback", "--run-config", str(run_config),
                           "--stream")

    def finish(self, run: subprocess.Popen, result_name: str) -> dict:
        try:
            run.wait(timeout=max(self.until - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{result_name} did not finish within {self.deadline_s}s\n{_logs(self.logs)}")
        path = self.out / f"{result_name}.json"
        assert run.returncode == 0 and path.exists(), f"{result_name}: no result\n{_logs(self.logs)}"
        return json.loads(path.read_text())


def test_loopback_federation_runs_fedavg_cluster_and_atlas(tmp_path):
    start = time.monotonic()
    with Loopback(tmp_path, DEADLINE_S) as loop:
        for i, port in enumerate(loop.node_ports):
            loop.node(i, port)
        # submitted together: the SuperNodes serve both runs
        runs = {method: loop.submit(method, method=method) for method in ("fedavg_cluster", "atlas")}
        results = {method: loop.finish(run, f"atlas_tiny-bert_{method}_seed0_r1") for method, run in runs.items()}
    # One resident worker per node and run answered all of that node's messages (fingerprint, train, evaluate).
    assert len(loop.served) == CLIENTS * len(runs) and min(loop.served) >= 3

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


def test_secure_loopback_runs_a_federation_and_refuses_strangers_and_plaintext(tmp_path):
    """TLS and SuperNode authentication: the four registered SuperNodes run `fedavg_cluster` to the end, while
    a SuperNode with a key the SuperLink never registered, and one that connects without TLS, are refused
    and exit."""
    with Loopback(tmp_path, DEADLINE_S, spare_ports=2, secure=True) as loop:
        for i, port in enumerate(loop.node_ports[:CLIENTS]):
            loop.node(i, port)
        stranger_key, _ = make_supernode_key(loop.certs, "stranger")
        refused = {"stranger": loop.node(0, loop.node_ports[CLIENTS], "", "--root-certificates",
                                         str(loop.certs / "ca.crt"), "--auth-supernode-private-key",
                                         str(stranger_key), "--max-retries", "1"),
                   "plaintext": loop.node(1, loop.node_ports[CLIENTS + 1], "", "--insecure", "--max-retries", "1")}
        result = loop.finish(loop.submit("fedavg_cluster", method="fedavg_cluster"),
                             "atlas_tiny-bert_fedavg_cluster_seed0_r1")
        for name, node in refused.items():
            try:
                node.wait(timeout=max(loop.until - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the {name} SuperNode was not refused\n{_logs(loop.logs)}")
        logs = {name: (loop.logs / f"supernode{i}-{loop.node_ports[CLIENTS + i]}.log").read_text()
                for i, name in enumerate(refused)}
    for name, reason in (("stranger", "Failed to activate SuperNode"),  # the SuperLink: no such key registered
                         ("plaintext", "Starting insecure channel")):
        assert refused[name].returncode != 0, logs[name]
        assert reason in logs[name] and "Failed to initialize the connection to the SuperLink" in logs[name], logs[name]
    validate_result(result)
    assert result["config"]["engine"] == "flower" and result["method"] == "fedavg_cluster"
    assert [c["client_id"] for c in result["clients"]] == list(range(CLIENTS))
    assert result["round_metrics"][0]["missing_clients"] == []


SURVIVAL_DEADLINE_S = 900  # measured 440-570 s on 2 shared cores
SURVIVAL_ROUNDS = 3


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_checkpoint(folder: Path, round_idx: int, until: float, logs: Path) -> None:
    while not (folder / f"round-00-{round_idx:04d}").is_dir():
        if time.monotonic() > until:
            pytest.fail(f"no checkpoint of round {round_idx} in {folder}\n{_logs(logs)}")
        time.sleep(0.2)


def test_loopback_deployment_survives_a_killed_supernode_and_a_killed_serverapp(tmp_path):
    """SuperNode 1 is SIGKILLed once round 1 is checkpointed and restarted at once: the run finishes,
    round 2 records client 1 missing, and in round 3 it is back in its cluster. Then the ServerApp of an
    `atlas` run is SIGKILLed once round 2 is checkpointed; `flwr run` with resume=true finishes it with the
    in-process engine's states and metrics (one thread everywhere)."""
    from atlasfl.config import build_config
    from atlasfl.experiment import run_and_save

    ck = tmp_path / "ck"
    name = f"atlas_tiny-bert_{{}}_seed0_r{SURVIVAL_ROUNDS}"
    clock = {}
    with Loopback(tmp_path, SURVIVAL_DEADLINE_S, spare_ports=1) as loop:
        extra = dict(rounds=SURVIVAL_ROUNDS, **{"checkpoint-dir": str(ck)})
        nodes = [loop.node(i, port) for i, port in enumerate(loop.node_ports[:CLIENTS])]
        # A killed SuperNode, restarted a round later.
        run = loop.submit("node-kill", method="fedavg_cluster", **extra)
        folder = ck / name.format("fedavg_cluster")
        _wait_for_checkpoint(folder, 1, loop.until, loop.logs)
        _kill(_descendants([nodes[1].pid]))
        clock["node_killed"] = time.monotonic()
        # Restarted at once, as a supervisor would: it registers as a new node while round 2 waits for the
        # SuperLink to give up on the old one (about 60 s without heartbeats), so it is back for round 3.
        loop.node(1, loop.node_ports[CLIENTS])
        _wait_for_checkpoint(folder, 2, loop.until, loop.logs)
        clock["round_2_done"] = time.monotonic()
        lost = loop.finish(run, name.format("fedavg_cluster"))
        # A killed ServerApp, resumed.
        run = loop.submit("server-kill", method="atlas", **extra)
        _wait_for_checkpoint(ck / name.format("atlas"), 2, loop.until, loop.logs)
        serverapps = {p for p in _descendants([p.pid for p in loop.procs]) if "flwr-serverapp" in _cmdline(p)}
        assert serverapps, f"no flwr-serverapp process found\n{_logs(loop.logs)}"
        _kill(serverapps | _descendants([run.pid]))
        clock["server_killed"] = time.monotonic()
        resumed = loop.finish(loop.submit("server-resume", method="atlas", resume=True, **extra), name.format("atlas"))
        clock["resume_done"] = time.monotonic()
    print(f"loopback survival: round 2 done {clock['round_2_done'] - clock['node_killed']:.1f}s after SuperNode 1 "
          f"was killed; the resumed run done {clock['resume_done'] - clock['server_killed']:.1f}s after the "
          "ServerApp was killed")

    validate_result(lost)
    first, second, third = lost["round_metrics"]
    assert (first["missing_clients"], second["missing_clients"], third["missing_clients"]) == ([], [1], [])
    assert lost["cluster_labels"][0] == lost["cluster_labels"][1]  # client 1's cluster partner is client 0
    assert second["state_digests"]["1"] == first["state_digests"]["1"] != second["state_digests"]["0"]
    assert third["state_digests"]["1"] == third["state_digests"]["0"]  # rejoined its cluster
    assert {c["client_id"]: c for c in second["clients"]}[1]["metrics_from_round"] == 1

    validate_result(resumed)
    reference, _ = run_and_save(build_config("tiny-bert", 0, "atlas", mode="quick", tasks=("gen_sentiment", "gen_pair"),
                                             rounds=SURVIVAL_ROUNDS, output_dir=str(tmp_path / "reference"),
                                             checkpoint_dir=str(tmp_path / "ck-reference"), **OVERRIDES),
                                progress=False)
    for ours, theirs in zip(resumed["round_metrics"], reference["round_metrics"], strict=True):
        assert ours["state_digests"] == theirs["state_digests"] and ours["missing_clients"] == []
        assert [c["test_metric"] for c in ours["clients"]] == [c["test_metric"] for c in theirs["clients"]]
    assert resumed["final_metrics"] == reference["final_metrics"]
