"""The deployed ClientApp's relay: a message answered by the resident worker is answered as the ATLAS ClientApp
answers it in-process, one worker serves a node's messages, and its errors reach the SuperNode."""
from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from atlasfl.engines.flower import resident
from atlasfl.engines.flower.client_app import app as client_app
from atlasfl.engines.flower.records import ATLAS, config_to_json
from atlasfl.errors import AtlasError

pytestmark = pytest.mark.slow


@pytest.fixture
def worker_dir(tmp_path, monkeypatch):
    """A private folder for the test's workers; every worker started in it is stopped afterwards. This process
    plays the ServerApp (node 1) that sends the messages."""
    for name, value in (("_task_id", 1), ("_run_id", 11), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    folder = tmp_path / "resident"
    monkeypatch.setenv(resident.DIR_VAR, str(folder))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker computes with one thread, as this process does
    yield folder
    for pid in _worker_pids(folder):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _worker_pids(folder) -> list[int]:
    return [int(pid) for log in folder.glob("*.log") for pid in re.findall(r"resident worker (\d+) listening",
                                                                           log.read_text())]


def _fingerprint_query(cfg, node_config: dict) -> tuple[Message, Context]:
    msg = Message(RecordDict({ATLAS: ConfigRecord({"config": config_to_json(cfg)})}), dst_node_id=7,
                  message_type="query.fingerprint")
    return msg, Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_the_resident_worker_answers_as_the_clientapp_does_and_serves_every_message(make_config, worker_dir):
    cfg = make_config(method="atlas")
    node = {"partition-id": 2, "num-partitions": 4}
    msg, direct_context = _fingerprint_query(cfg, node)
    direct = client_app(message=msg, context=direct_context)

    relayed_msg, context = _fingerprint_query(cfg, dict(node, **{"keep-alive-s": 60.0}))
    relayed = resident.relay(relayed_msg, context)
    assert (relayed.metadata.src_node_id, relayed.metadata.dst_node_id) == (7, 1)  # a reply to the server
    assert relayed.content[ATLAS]["client"] == direct.content[ATLAS]["client"]
    for key, array in direct.content["fingerprint"].items():
        np.testing.assert_allclose(relayed.content["fingerprint"][key].numpy(), array.numpy(), rtol=1e-5, atol=1e-7)
    assert relayed.content["transport"]["up_payload"] == direct.content["transport"]["up_payload"]
    # The worker's Context.state came back: the run config the fingerprint message made the client adopt.
    assert context.state[ATLAS]["config"] == direct_context.state[ATLAS]["config"]

    identify = Message(RecordDict({ATLAS: ConfigRecord({})}), dst_node_id=7, message_type="query.identify")
    assert resident.relay(identify, context).content[ATLAS]["client_id"] == 2
    assert len(_worker_pids(worker_dir)) == 1  # both messages went to one process


def test_a_client_error_in_the_worker_is_raised_by_the_relay(make_config, worker_dir):
    msg, context = _fingerprint_query(make_config(), {"num-partitions": 4, "keep-alive-s": 60.0})  # no partition-id
    with pytest.raises(AtlasError, match="no partition-id in its node config"):
        resident.relay(msg, context)
    assert len(_worker_pids(worker_dir)) == 1  # and the worker lives on for the next message


def test_keep_alive_zero_answers_in_the_calling_process(make_config, worker_dir):
    msg, context = _fingerprint_query(make_config(), {"partition-id": 0, "num-partitions": 4, "keep-alive-s": 0.0})
    assert resident.relay(msg, context).content[ATLAS]["client"]
    assert not worker_dir.exists() or not list(worker_dir.iterdir())


def test_an_idle_worker_exits_and_the_next_message_starts_another(make_config, worker_dir):
    cfg = make_config()
    node = {"partition-id": 0, "num-partitions": 4, "keep-alive-s": 1.0}
    msg, context = _fingerprint_query(cfg, node)
    resident.relay(msg, context)
    [log] = worker_dir.glob("*.log")
    deadline = time.monotonic() + 60
    while "exits after 1 messages" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "exits after 1 messages" in log.read_text()
    msg, context = _fingerprint_query(cfg, node)
    assert resident.relay(msg, context).content[ATLAS]["client"]
    assert len(_worker_pids(worker_dir)) == 2


def test_a_folder_others_can_enter_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    monkeypatch.setenv(resident.DIR_VAR, str(folder))
    with pytest.raises(AtlasError, match="private to it"):
        resident.resident_dir()
    folder.chmod(0o700)
    assert resident.resident_dir() == folder
