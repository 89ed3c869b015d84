#!/usr/bin/env python
"""What Flower 1.42's SecAgg+ costs and how exactly it sums, on LoRA-shaped updates: Flower's own
`SecAggPlusWorkflow` (ServerApp side) and `secaggplus_mod` (ClientApp side) run their four stages over an
in-memory grid that hands each message to its client, against the plain weighted mean of the same updates.

    python benchmarks/secagg_probe.py                        # 4 clients, MiniLM's 12 modules at rank 8
    python benchmarks/secagg_probe.py --clients 12 --scale 1e-3

Nothing of ATLAS runs: this measures the protocol itself (docs/flower.md#secure-aggregation), which needs
Flower's legacy `LegacyContext` + `Strategy` and replies in the legacy `FitRes` layout, and which ATLAS's
message-API ServerApp does not use. Prints the message exchanges, the bytes uploaded per client beside the
float32 factors, the largest error of the secure mean against the exact one, and the seconds of both.
"""
import argparse
import copy
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    fitres_to_recorddict,
    parameters_to_arrayrecord,
)
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LoopGrid(Grid):
    """Hands each message to its client's handler at once and returns the replies (what a deployed grid does
    over the network); counts the exchanges and the masked vectors' bytes."""

    def __init__(self, clients: dict[int, Callable[[Message], Message]]):
        self.clients, self.exchanges, self.masked_bytes = clients, 0, {nid: 0 for nid in clients}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.exchanges += 1
        replies = []
        for msg in map(copy.deepcopy, messages):  # a copy each, as the network delivers them
            reply = self.clients[msg.metadata.dst_node_id](msg)
            masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
            self.masked_bytes[msg.metadata.dst_node_id] += sum(len(b) for b in masked)
            replies.append(reply)
        return replies

    def set_run(self, run):  # the probe has no run
        raise NotImplementedError

    run = create_message = get_node_ids = push_messages = pull_messages = set_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--modules", type=int, default=12)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=1e-2, help="std of the update's entries")
    p.add_argument("--max-weight", type=float, default=1000.0,
                   help="SecAggPlusWorkflow's max_weight (Flower's default 1000): each update is scaled by its "
                        "shard size / max_weight before quantizing, so a loose bound costs precision")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    shapes = [s for _ in range(a.modules) for s in ((a.rank, a.dim), (a.dim, a.rank))]
    updates = {nid: [rng.normal(0, a.scale, s).astype(np.float32) for s in shapes] for nid in range(1, a.clients + 1)}
    weights = {nid: int(w) for nid, w in zip(updates, rng.integers(20, 60, a.clients))}

    def client(nid: int):
        ctxt = Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})

        def train(msg: Message, _ctxt: Context) -> Message:
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(updates[nid]), weights[nid], {})
            return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)
        return lambda msg: secaggplus_mod(msg, ctxt, train)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process is told
    grid = LoopGrid({nid: client(nid) for nid in updates})
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=a.clients, min_available_clients=a.clients)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    for nid in updates:
        context.client_manager.register(GridClientProxy(nid, grid, run_id=1))
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(s, np.float32) for s in shapes]), keep_input=True)
    t0 = time.perf_counter()
    SecAggPlusWorkflow(num_shares=a.clients, reconstruction_threshold=max(2, a.clients // 2 + 1),
                       max_weight=a.max_weight)(grid, context)
    secure_s = time.perf_counter() - t0
    secure = parameters_to_ndarrays(arrayrecord_to_parameters(context.state[MAIN_PARAMS_RECORD], keep_input=True))
    t0 = time.perf_counter()
    total = sum(weights.values())
    exact = [sum(weights[nid] * updates[nid][i].astype(np.float64) for nid in updates) / total
             for i in range(len(shapes))]
    plain_s = time.perf_counter() - t0
    err = max(float(np.max(np.abs(s - e))) for s, e in zip(secure, exact, strict=True))
    rms = float(np.sqrt(np.mean(np.concatenate([(s - e).ravel() ** 2 for s, e in zip(secure, exact, strict=True)]))))
    spread = max(float(np.max(np.abs(e))) for e in exact)
    factors = sum(int(np.prod(s)) for s in shapes) * 4
    up = np.mean(list(grid.masked_bytes.values()))
    print(f"{a.clients} clients (shards {sorted(weights.values())}, max_weight {a.max_weight:g}), {a.modules} modules "
          f"of rank {a.rank} at d={a.dim}, entries ~ N(0, {a.scale:g})")
    print(f"message exchanges per round: {grid.exchanges} (a plain round: 1)")
    print(f"masked upload per client: {up:,.0f} B (float32 factors: {factors:,} B, x{up / factors:.2f})")
    print(f"|secure - exact| over all entries: largest {err:.2e}, rms {rms:.2e} (largest |exact| {spread:.2e})")
    print(f"seconds: SecAgg+ {secure_s:.2f} (all clients and server, one process), plain weighted mean {plain_s:.4f}")


if __name__ == "__main__":
    main()
