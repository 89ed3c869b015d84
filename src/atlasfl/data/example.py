"""What every task source yields, and the seed helper the sources and partitions share. A leaf module, so
the task registry (tasks.py) and its sources (glue.py, offline.py, generated.py) import it without a cycle."""

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


Split = tuple[list[Example], list[Example]]  # (train, test), as every source's loader returns them


def stable_seed(*parts) -> int:
    """A seed from strings, equal across processes (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")
