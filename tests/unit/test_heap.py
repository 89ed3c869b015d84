"""`release_freed_memory` hands the heap's free pages back: resident memory left by freed tensors drops."""
from __future__ import annotations

import pytest
import torch

from atlasfl.heap import _malloc_trim, release_freed_memory, resident_mb


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim is not available here")
def test_freed_tensors_stop_counting_once_released():
    release_freed_memory()
    start = resident_mb()
    kept, freed = [], []
    for i in range(2000):  # 100 KB each, under glibc's threshold for a mapping of their own: from the heap
        freed.append(torch.empty(25_000 + i % 7).fill_(1.0))
        kept.append(torch.ones(3 + i % 5))  # small ones stay between them, so no free stretch ends the heap
    del freed
    held = resident_mb() - start
    release_freed_memory()
    after = resident_mb() - start
    if held < 20:
        pytest.skip(f"this C library returned the freed memory by itself ({held:.0f} MB held): nothing to release")
    assert after < held / 2, (held, after)
    assert len(kept) == 2000
