"""The ClientApp a deployed SuperNode runs: it hands each message to a resident worker process.

Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for every message. Run there, the ATLAS
ClientApp (`client_app.py`) would import torch, transformers and peft and rebuild the model and the
client's shard for every train and evaluate message, many times the work itself for a tiny model
(measured: docs/performance.md, "Flower deployment"). So this app imports
nothing heavier than Flower: per run, the first message of a node starts a worker process
(`python -m atlasfl.engines.flower.resident`) that imports the ClientApp once and keeps its per-process
cache (the model and the encoded shard) between messages, as a Ray actor does in simulation; every
message is then relayed to it over a Unix socket, as Flower's own protobuf bytes, and its reply and
`Context.state` come back the same way. The state a client must keep still lives in `Context.state`
and travels with every message, so a worker that is lost (killed, timed out) costs one cold start and
nothing else: the next message starts a new one.

Node config `keep-alive-s` (seconds; default 600) is how long a worker waits for its next message
before it exits; `keep-alive-s=0` runs every message in the `flwr-clientapp` process itself, as Flower
does by default. A worker also exits when the SuperNode's process that launched its first message
(Flower's SuperExec) is gone. Sockets, locks and the workers' logs live in `$ATLASFL_RESIDENT_DIR`
(default: `atlasfl-resident-<uid>` in the temporary folder), readable by this user only.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

from atlasfl.errors import AtlasError

KEEP_ALIVE_S = 600.0
DIR_VAR = "ATLASFL_RESIDENT_DIR"
START_TIMEOUT_S = 120.0  # a worker binds its socket before it imports anything heavy

app = ClientApp()


def relay(msg: Message, context: Context) -> Message:
    """Answer `msg` with the ATLAS ClientApp: in this process if `keep-alive-s` is 0, else in this node's
    resident worker for this run. `context.state` ends as the worker left it."""
    keep_alive = float(context.node_config.get("keep-alive-s", KEEP_ALIVE_S))
    if keep_alive <= 0:
        from atlasfl.engines.flower.client_app import app as client_app
        return client_app(message=msg, context=context)
    request = [message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()]
    path = _socket_path(context)
    for attempt in (1, 2):  # a worker that died, or ran out of keep-alive as we connected: start another, once
        try:
            with _connect(path, keep_alive) as conn:
                _send(conn, request)
                status, *blobs = _receive(conn)
            break
        except (ConnectionError, EOFError):
            if attempt == 2:
                raise
    if status == b"error":
        kind, text = (b.decode() for b in blobs)
        raise (AtlasError(text) if kind == "AtlasError" else RuntimeError(f"{kind} in the resident worker: {text}"))
    content, state = blobs
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(state))
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(content)), reply_to=msg)


# Every message type the ATLAS ClientApp answers (a test keeps the two apps in step).
app.train()(relay)
app.evaluate()(relay)
app.query("fingerprint")(relay)
app.query("identify")(relay)
app.query("offer")(relay)
app.query("catch_up")(relay)


def resident_dir() -> Path:
    folder = Path(os.environ.get(DIR_VAR) or Path(tempfile.gettempdir()) / f"atlasfl-resident-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise AtlasError(f"{folder} must belong to this user and be private to it (chmod 700), or set {DIR_VAR} "
                         f"to another folder: resident workers take work from its sockets")
    return folder


def _socket_path(context: Context) -> Path:
    """One worker per node and run: a new run (new code, new config) gets a fresh process."""
    key = hashlib.blake2b(f"{context.node_id}/{context.run_id}".encode(), digest_size=6).hexdigest()
    path = resident_dir() / f"w{key}.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        raise AtlasError(f"the socket path {path} is too long for a Unix socket; set {DIR_VAR} to a shorter folder")
    return path


def _connect(path: Path, keep_alive: float) -> socket.socket:
    """A connection to the worker at `path`, started (under a lock, so one per node and run) if none answers."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _open(path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        path.unlink(missing_ok=True)  # a worker that died without removing its socket
        log = path.with_suffix(".log")
        with open(log, "a") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "atlasfl.engines.flower.resident", str(path), "--keep-alive-s", str(keep_alive),
                 "--parent-pid", str(os.getppid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the resident worker exited with code {worker.returncode} before it listened; "
                                   f"its log {log} ends:\n{log.read_text()[-2000:]}")
            try:
                return _open(path)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        worker.kill()
        raise RuntimeError(f"the resident worker did not listen on {path} within {START_TIMEOUT_S:.0f} s; see {log}")


def _open(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _send(conn: socket.socket, blobs: list[bytes]) -> None:
    """A frame: the number of blobs, then each blob's length and bytes (unsigned 64-bit, big-endian)."""
    conn.sendall(struct.pack(">Q", len(blobs)) + b"".join(struct.pack(">Q", len(b)) + b for b in blobs))


def _receive(conn: socket.socket) -> list[bytes]:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the resident worker closed the connection before it answered")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    count = struct.unpack(">Q", exactly(8))[0]
    return [exactly(struct.unpack(">Q", exactly(8))[0]) for _ in range(count)]


def answer(client_app: ClientApp, request: list[bytes]) -> list[bytes]:
    """The worker's side of one message: run the ATLAS ClientApp on it; its reply and Context.state, or its error."""
    msg = message_from_proto(ProtoMessage.FromString(request[0]))
    context = context_from_proto(ProtoContext.FromString(request[1]))
    try:
        reply = client_app(message=msg, context=context)
    except Exception as error:  # noqa: BLE001 (reported to the relay, which raises it in the flwr-clientapp process)
        traceback.print_exc()
        return [b"error", type(error).__name__.encode(), str(error).encode()]
    return [b"ok", recorddict_to_proto(reply.content).SerializeToString(),
            recorddict_to_proto(context.state).SerializeToString()]


def serve(path: Path, keep_alive: float, parent_pid: int) -> None:
    """Answer messages on `path`, one at a time, until none came for `keep_alive` seconds or `parent_pid` is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(1.0)
    print(f"resident worker {os.getpid()} listening on {path}", flush=True)
    from atlasfl.engines.flower.client_app import app as client_app  # the slow imports, while the relay waits
    last, served = time.monotonic(), 0
    try:
        while time.monotonic() - last < keep_alive and _alive(parent_pid):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                start = time.monotonic()
                _send(conn, answer(client_app, _receive(conn)))
            served += 1
            last = time.monotonic()
            print(f"message {served} answered in {last - start:.3f} s", flush=True)
    finally:
        path.unlink(missing_ok=True)
        listener.close()
        print(f"resident worker {os.getpid()} exits after {served} messages", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def main() -> None:
    p = argparse.ArgumentParser(description="A resident ATLAS ClientApp worker (started by the relay, not by hand).")
    p.add_argument("socket", type=Path)
    p.add_argument("--keep-alive-s", type=float, default=KEEP_ALIVE_S)
    p.add_argument("--parent-pid", type=int, required=True)
    a = p.parse_args()
    serve(a.socket, a.keep_alive_s, a.parent_pid)


if __name__ == "__main__":
    main()
