"""Count-sketch compression of fingerprints on the client (docs/design.md §3.1).

A linear map R^d → R^dim: coordinate i goes to bucket h(i) with sign s(i). The hash is drawn
chunk by chunk from a CPU generator seeded with (seed, chunk index), so memory stays O(chunk),
no d×dim matrix ever exists, and every client with the same seed and chunk applies the same map.
E⟨S a, S b⟩ = ⟨a, b⟩, so inner products and distances are preserved in expectation.
`count_sketch_rows` applies the very same map to every row of a matrix at once (the representation
fingerprint sketches each example, so that its sampling variance is measured in the space the server
compares clients in).
"""
from __future__ import annotations

import numpy as np
import torch


def chunk_generator(seed: int, chunk_index: int) -> torch.Generator:
    """A CPU generator for one chunk; SeedSequence mixes (seed, index) into well-spread state."""
    state = np.random.SeedSequence([seed, chunk_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _bucket_map(seed: int, index: int, size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of each of `size` coordinates of chunk `index`."""
    gen = chunk_generator(seed, index)
    buckets = torch.randint(0, dim, (size,), generator=gen)
    signs = torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1
    return buckets, signs


def _check(dim: int, chunk: int) -> None:
    if dim < 1 or chunk < 1:
        raise ValueError(f"dim and chunk must be positive, got dim={dim}, chunk={chunk}")


def count_sketch(vec: torch.Tensor, dim: int = 64, seed: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """Sketch a 1-D tensor to `dim` numbers: float64 on the CPU for exact reproducibility, returned as float32."""
    if vec.ndim != 1:
        raise ValueError(f"count_sketch takes a 1-D tensor, got shape {tuple(vec.shape)}")
    _check(dim, chunk)
    values = vec.detach().to(device="cpu", dtype=torch.float64)
    out = torch.zeros(dim, dtype=torch.float64)
    for index, start in enumerate(range(0, values.numel(), chunk)):
        part = values[start : start + chunk]
        buckets, signs = _bucket_map(seed, index, part.numel(), dim)
        out.index_add_(0, buckets, signs * part)
    return out.to(torch.float32)


def count_sketch_rows(rows: torch.Tensor, dim: int = 64, seed: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """`count_sketch` of every row of an n×d matrix, as one n×dim float64 matrix (not rounded to float32)."""
    if rows.ndim != 2:
        raise ValueError(f"count_sketch_rows takes an n×d matrix, got shape {tuple(rows.shape)}")
    _check(dim, chunk)
    values = rows.detach().to(device="cpu", dtype=torch.float64)
    out = torch.zeros(values.shape[0], dim, dtype=torch.float64)
    for index, start in enumerate(range(0, values.shape[1], chunk)):
        part = values[:, start : start + chunk]
        buckets, signs = _bucket_map(seed, index, part.shape[1], dim)
        out.index_add_(1, buckets, part * signs)
    return out
