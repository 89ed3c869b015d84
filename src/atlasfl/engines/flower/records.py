"""What the Flower app's messages carry, shared by its ServerApp and ClientApp: trainable states as
`ArrayRecord`s at the wire dtype, the run config, and the size accounting of every message.

Sizes are measured the way Flower's own `message_size_mod`/`arrays_size_mod` measure them
(`count_bytes()` of the records), plus the raw tensor payload read from each `Array`'s dtype and
shape, which is what our own accounting (`federation.wire.wire`) counts.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from atlasfl.config import RunConfig
from atlasfl.federation.wire import WIRE_DTYPES

State = dict[str, torch.Tensor]
ATLAS = "atlas"  # ConfigRecord of control values (round, flags, config, ranks, replies' metrics)
STATE = "state"  # ArrayRecord of a trainable state (adapter factors and head)
CANDIDATE = "candidate-"  # + j: ArrayRecords of an offer's candidate states (`Transport.offer`)
CHOICE = "choice"  # ArrayRecord of an offer's reply: the adopted candidate's index, one int32
MISSED = "missed-"  # + j: ArrayRecords of the downloads a client missed, oldest first (`Transport.catch_up`)
# Copies that only make a run survive, never part of the algorithm's traffic: a client's exact float32 state
# sent back to the ServerApp's checkpoint (BACKUP: clients that share nothing this round, or that caught up) or
# restored to a node that lost it (RESTORE: a restarted SuperNode, a failed round, a resumed run).
BACKUP = "backup"
RESTORE = "restore"
SURVIVAL = (BACKUP, RESTORE)
TRANSPORT = "transport"  # MetricRecord the ClientApp adds to each reply: what Flower carried both ways
# bfloat16 has no NumPy dtype: it travels as its 16-bit patterns and is viewed back on arrival.
_BITS = {torch.bfloat16: torch.int16}


def state_to_record(state: State, wire_dtype: str) -> tuple[ArrayRecord, int]:
    """The state as sent (every tensor at the wire dtype) and the bytes our accounting counts for it."""
    wd = WIRE_DTYPES[wire_dtype]
    arrays = {}
    for key, tensor in state.items():
        t = tensor.detach().cpu().to(wd).contiguous()
        arrays[key] = (t.view(_BITS[wd]) if wd in _BITS else t).numpy()
    nbytes = sum(a.nbytes for a in arrays.values())
    return ArrayRecord(torch_state_dict={k: torch.from_numpy(a) for k, a in arrays.items()}), nbytes


def record_to_state(record: ArrayRecord, wire_dtype: str) -> State:
    """A received state back in float32 (the dtype the clients train in), as `federation.wire.wire` does; an array
    sent at another dtype than the wire dtype is a ValueError (the strategy counts the client missing)."""
    wd = WIRE_DTYPES[wire_dtype]
    sent = str(_BITS.get(wd, wd)).removeprefix("torch.")
    out = {}
    for key, array in record.items():
        if array.dtype != sent:
            raise ValueError(f"{key} arrived as {array.dtype}, the run's wire dtype is {wire_dtype} ({sent})")
        t = torch.from_numpy(np.array(array.numpy()))
        out[key] = (t.view(wd) if wd in _BITS else t).to(torch.float32)
    return out


def plain_record(state: State) -> ArrayRecord:
    """A float32 state for `Context.state`: it stays on the node, never on the wire."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})


def plain_state(record: ArrayRecord) -> State:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def config_to_json(cfg: RunConfig) -> str:
    return cfg.model_dump_json()


def config_from_json(text: str, **updates) -> RunConfig:
    """The server's run config, with a node's own settings (its data folder, its device) in `updates`."""
    return RunConfig.model_validate({**json.loads(text), **updates})


def content_sizes(content: RecordDict) -> dict[str, int]:
    """message: Flower's count of all records; arrays: its count of the ArrayRecords (data plus
    serialisation headers and keys); payload: the tensor bytes alone (numel x itemsize); all three without
    the SURVIVAL copies, whose tensor bytes are `survival_payload`."""
    def payload(record: ArrayRecord) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())

    kept = {name: r for name, r in content.items() if name not in SURVIVAL}
    arrays = {name: r for name, r in content.array_records.items() if name not in SURVIVAL}
    return dict(message=sum(r.count_bytes() for r in kept.values()),
                arrays=sum(r.count_bytes() for r in arrays.values()),
                payload=sum(payload(r) for r in arrays.values()),
                survival_payload=sum(payload(r) for name, r in content.array_records.items() if name in SURVIVAL))


def transport_size_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: measures the incoming message and the reply (before this record is added) and
    reports both in the reply, so the server can put what Flower carried beside our accounting."""
    incoming = content_sizes(msg.content)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    outgoing = content_sizes(reply.content)
    reply.content[TRANSPORT] = MetricRecord({**{f"down_{k}": v for k, v in incoming.items()},
                                             **{f"up_{k}": v for k, v in outgoing.items()}})
    return reply
