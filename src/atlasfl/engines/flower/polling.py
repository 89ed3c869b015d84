"""The ServerApp's message exchange with the SuperNodes: push, then wait for the replies."""
from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from atlasfl.errors import AtlasError

# Per message round. A killed SuperNode stops heartbeating and the SuperLink answers for it with an error
# within 2 x its 30 s heartbeat interval; this bounds only a node that is alive but silent.
REPLY_TIMEOUT_S = 3600.0
# Waits between checks for replies: the first, and the longest it grows to (x1.5 per check).
REPLY_POLL_S = (0.05, 1.0)


def message(content: RecordDict, node: int, message_type: str, group: int = 0) -> Message:
    return Message(content, dst_node_id=node, message_type=message_type, group_id=str(group))


def send_and_receive(grid: Grid, messages: list[Message], timeout: float = REPLY_TIMEOUT_S) -> list[Message]:
    """`Grid.send_and_receive`, checking for replies after 0.05 s and then ever less often up to every second:
    Flower 1.42's deployed grid checks every 3 s, and a round pays that wait twice (train, evaluate) however
    quick its clients are. The replies that came within `timeout`."""
    pending = set(grid.push_messages(messages))
    replies, wait, deadline = [], REPLY_POLL_S[0], time.monotonic() + timeout
    while True:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {reply.metadata.reply_to_message_id for reply in got}
        if not pending or time.monotonic() >= deadline:
            return replies
        time.sleep(wait)
        wait = min(wait * 1.5, REPLY_POLL_S[1])


def exchange_all(grid: Grid, messages: list[Message], what: str) -> list[Message]:
    """Every node's reply, or a clear error naming the client's failure (where every client must answer)."""
    replies: Iterable[Message] = send_and_receive(grid, messages)
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            raise AtlasError(f"a client failed during {what}: {reply.error.reason}")
    if len(replies) != len(messages):
        raise AtlasError(f"{what}: {len(replies)} of {len(messages)} clients replied within {REPLY_TIMEOUT_S:.0f}s")
    return replies
