"""The ServerApp's wait for replies: every reply is collected, checks come quickly at first and never more than a
second apart, and a timeout returns what came."""
from __future__ import annotations

from types import SimpleNamespace

from atlasfl.engines.flower import polling


class SlowGrid:
    """Replies to message i arrive at the pull numbered arrives[i]; records the waits between pulls."""

    def __init__(self, arrives: list[int]):
        self.arrives, self.pulls, self.waits = arrives, 0, []

    def push_messages(self, messages):
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.arrives) if at == self.pulls and f"m{i}" in ids]


def test_replies_are_collected_with_growing_waits(monkeypatch):
    grid = SlowGrid([1, 3, 12])
    monkeypatch.setattr(polling.time, "sleep", grid.waits.append)
    replies = polling.send_and_receive(grid, [object()] * 3)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 12  # stopped at the last reply
    first, longest = polling.REPLY_POLL_S
    assert grid.waits[0] == first and max(grid.waits) == longest
    assert all(b == min(a * 1.5, longest) for a, b in zip(grid.waits, grid.waits[1:]))


def test_a_timeout_returns_the_replies_that_came(monkeypatch):
    grid = SlowGrid([2, 10**9])
    clock = iter(range(100))
    monkeypatch.setattr(polling.time, "sleep", lambda s: None)
    monkeypatch.setattr(polling.time, "monotonic", lambda: next(clock))
    replies = polling.send_and_receive(grid, [object()] * 2, timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls == 5
