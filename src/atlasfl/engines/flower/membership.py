"""Which SuperNode serves which client, and which nodes hold what their client needs: the run config, its ranks
and its current state. A restarted SuperNode registers as a new node; it and every node of a resumed run are
identified and brought up to date with their next message (the server keeps an exact copy of every state)."""
from __future__ import annotations

import logging
import time

from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid

from atlasfl.engines.flower.polling import message, send_and_receive
from atlasfl.engines.flower.records import ATLAS
from atlasfl.errors import AtlasError

log = logging.getLogger("atlasfl")
CONNECT_TIMEOUT_S = 300.0  # how long the ServerApp waits for every SuperNode to connect


class Membership:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.synced: set[int] = set()  # clients whose node holds the run config, ranks and the server's copy
        self.online: set[int] = set()  # node ids online at the start of the current round

    def wait_for_nodes(self, expected: int) -> list[int]:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected:
                return nodes
            if time.monotonic() > deadline:
                raise AtlasError(f"only {len(nodes)} of {expected} SuperNodes connected within "
                                 f"{CONNECT_TIMEOUT_S:.0f}s")
            time.sleep(1.0)

    def join(self, cid: int, node: int) -> None:
        """Client `cid` answered from `node`, which now holds all it needs."""
        self.node_of[cid] = node
        self.synced.add(cid)

    def refresh(self, clients: set[int]) -> None:
        """Note which nodes are online and identify the ones this run has not met: their client (one of
        `clients`) gets the run config, ranks and its state with its next message."""
        self.online = set(self.grid.get_node_ids())
        new = sorted(self.online - set(self.node_of.values()))
        if not new:
            return
        replies = send_and_receive(self.grid, [message(RecordDict(), n, MessageType.QUERY + ".identify") for n in new])
        for reply in replies:
            if not reply.has_error():
                cid = int(reply.content[ATLAS]["client_id"])
                if cid in clients:
                    self.node_of[cid] = reply.metadata.src_node_id
                    self.synced.discard(cid)
                    log.info("client %d is on node %d", cid, reply.metadata.src_node_id)

    def reachable(self, cid: int) -> bool:
        return self.node_of.get(cid) in self.online
