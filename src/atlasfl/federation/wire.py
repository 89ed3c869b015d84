"""What a state looks like after a trip over the wire at the run's wire dtype."""
from __future__ import annotations

import torch

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire(state: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state as it arrives after a trip at the wire dtype, and the bytes that trip carried."""
    wd = WIRE_DTYPES[dtype]
    sent = {k: v.to(wd) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in sent.values())
    return {k: v.to(state[k].dtype) for k, v in sent.items()}, nbytes
