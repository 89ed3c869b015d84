"""Poisoned replies (`federation.replies`) in a tiny in-process run: a reply with NaNs, a wrong shape, a wrong key
set or a norm 1000x its group's median is left out of its round with its reason, its client goes back to its state
before the round, and the run goes on; an honest run is the same with the checks on or off."""
from __future__ import annotations

import torch

from atlasfl.engines import inprocess
from atlasfl.experiment import run_and_save
from atlasfl.federation import driver
from tests.conftest import comparable, force_clusters

GROUPS = [0, 0, 1, 1]  # two groups of two


def nan(state):
    key = next(iter(state))
    return {**state, key: torch.full_like(state[key], float("nan"))}


def reshaped(state):
    key = next(k for k in state if k.endswith("::A"))
    return {**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}


def extra_key(state):
    return {**state, "head::extra": torch.zeros(1)}


def huge(state):
    return {k: v * 1000 for k, v in state.items()}


POISON = {2: {1: nan, 2: reshaped}, 3: {0: extra_key, 3: huge}}  # round -> client -> what its reply becomes


def test_poisoned_replies_are_left_out_recorded_and_the_run_goes_on(make_config, monkeypatch):
    force_clusters(monkeypatch, GROUPS)
    real = inprocess.InProcess.train

    def poisoned(self, round_idx, cohort, sharing, advance, **kw):
        out = real(self, round_idx, cohort, sharing, advance, **kw)
        for cid, poison in POISON.get(round_idx, {}).items():
            out.uploads[cid] = poison(out.uploads[cid])
        return out

    monkeypatch.setattr(inprocess.InProcess, "train", poisoned)
    result, _ = run_and_save(make_config(method="fedavg_cluster", rounds=4), progress=False)
    r1, r2, r3, r4 = result["round_metrics"]
    assert r1["missing_clients"] == [] and r4["missing_clients"] == []
    assert r2["missing_clients"] == [1, 2] and r3["missing_clients"] == [0, 3]
    why = {**r2["missing_reasons"], **r3["missing_reasons"]}
    assert "not finite" in why["1"] and "has shape" in why["2"] and "unexpected ['head::extra']" in why["0"]
    assert "--reply-norm-bound 100 x its group's median" in why["3"]
    d1, d2, d3, d4 = (r["state_digests"] for r in result["round_metrics"])
    # A rejected client keeps its state from before the round; its partner's aggregate is its partner's alone.
    assert d2["1"] == d1["1"] and d2["2"] == d1["2"] and d3["0"] == d2["0"] and d3["3"] == d2["3"]
    assert d2["0"] != d1["0"] and d3["1"] != d2["1"]
    assert d4["0"] == d4["1"] and d4["2"] == d4["3"]  # all rejoined their groups
    kept = {c["client_id"]: c for c in r2["clients"]}[1]
    assert kept["missing"] is True and kept["metrics_from_round"] == 1 and kept["bytes_up"] > 0  # it did upload


def test_an_honest_run_is_the_same_with_the_checks_on_or_off(make_config, monkeypatch):
    rejected = []
    check = driver.check_replies

    def spy(*args):
        good, bad = check(*args)
        rejected.append(bad)
        return good, bad

    monkeypatch.setattr(driver, "check_replies", spy)
    on = inprocess.run_experiment(make_config(method="standard_fl"), progress=False)
    off = inprocess.run_experiment(make_config(method="standard_fl", reply_norm_bound=0), progress=False)
    assert rejected == [{}] * 4
    a, b = comparable(on), comparable(off)
    assert (a["config"].pop("reply_norm_bound"), b["config"].pop("reply_norm_bound")) == (100.0, 0.0)
    assert [r["state_digests"] for r in a["round_metrics"]] == [r["state_digests"] for r in b["round_metrics"]]
    assert a == b


def poisoning(round_idx: int):
    """A ClientApp mod that, in round `round_idx`, sends client 1's upload at float16 (not the run's wire dtype: the
    server cannot decode it) and client 2's with NaNs, as a faulty or hostile client would."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, MessageType

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        cid = context.node_config["partition-id"]
        if (msg.metadata.message_type == MessageType.TRAIN and int(msg.content["atlas"]["round"]) == round_idx
                and cid in (1, 2) and "state" in reply.content.array_records):
            arrays = {k: np.array(a.numpy()) for k, a in reply.content["state"].items()}
            bad = {k: a.astype(np.float16) if cid == 1 else np.full_like(a, np.nan) for k, a in arrays.items()}
            reply.content["state"] = ArrayRecord(array_dict={k: Array(a) for k, a in bad.items()})
        return reply
    return mod


def test_flower_replies_that_cannot_be_decoded_or_hold_nans_are_missing_clients(make_config, monkeypatch):
    from atlasfl.engines.flower import client_app

    force_clusters(monkeypatch, GROUPS)
    monkeypatch.setattr(client_app, "app", client_app.make_client_app(poisoning(2)))
    result, _ = run_and_save(make_config(method="fedavg_cluster", rounds=3, engine="flower"), progress=False)
    r1, r2, r3 = result["round_metrics"]
    assert r1["missing_clients"] == [] and r3["missing_clients"] == [] and r2["missing_clients"] == [1, 2]
    assert "unreadable reply" in r2["missing_reasons"]["1"] and "arrived as float16" in r2["missing_reasons"]["1"]
    assert "not finite" in r2["missing_reasons"]["2"]
    d1, d2, d3 = (r["state_digests"] for r in result["round_metrics"])
    assert d2["1"] == d1["1"] and d2["2"] == d1["2"] and d2["0"] != d1["0"]
    assert d3["0"] == d3["1"] and d3["2"] == d3["3"]  # restored from the server's copy, they rejoined
