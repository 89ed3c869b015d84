"""Handing freed heap memory back to the operating system.

glibc's malloc keeps on its heap what a process frees, and after each large free it raises the size from which it
maps an allocation of its own, so later large tensors come from the heap too. Phase 1 allocates and frees large
tensors of varying shapes once per client, and resident memory then grew with the population although nothing
was kept (docs/scale.md: 664 MB of 1,341 returned by one `malloc_trim` after 120 MiniLM clients' fingerprints).
`malloc_trim(0)` returns the heap's free pages; where the C library is not glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import resource


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the pages the heap holds free to the operating system (glibc), once a pass has freed what it made."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_mb() -> float:
    """The process's resident memory now, in MB (10^6 bytes), from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6
