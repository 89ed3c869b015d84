#!/usr/bin/env python
"""What one more client costs the shared model as the population grows: seconds to add a client's adapter and
head, seconds to activate a client (train mode, then eval mode, as a round's training and testing do), and the
resident memory the clients' modules hold against the bytes of their tensors. Each size in a fresh process of
one thread, so each memory figure is its own.

    python benchmarks/population_cost.py --model tiny-bert --clients 12 120 400 1200
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
import warnings


def measure(model: str, n: int) -> None:
    warnings.simplefilter("ignore")
    import torch

    from atlasfl.heap import resident_mb
    from atlasfl.models.lora import FederatedLoRAModel
    from atlasfl.models.registry import load_backbone

    torch.set_num_threads(1)
    fm = FederatedLoRAModel(load_backbone(model, init="random", seed=0), alpha=16.0, dropout=0.05, seed=0)
    ranks = {m: 4 for m in fm.modules}
    fm.add_client(0, ranks, 2)
    gc.collect()
    before = resident_mb()
    t0 = time.perf_counter()
    for cid in range(1, n):
        fm.add_client(cid, ranks, 2)
    build_s = time.perf_counter() - t0
    gc.collect()
    held_mb = resident_mb() - before
    tensor_mb = sum(p.numel() * p.element_size() for cid in range(1, n) for p in fm.trainable_parameters(cid)) / 1e6
    sampled = range(0, n, max(1, n // 50))
    t0 = time.perf_counter()
    for cid in sampled:
        fm.activate(cid, train=True)
        fm.activate(cid, train=False)
    activate_ms = (time.perf_counter() - t0) / (2 * len(sampled)) * 1e3
    print(f"{model:10} {n:>6} clients  build {build_s:7.2f} s ({build_s / max(n - 1, 1) * 1e3:5.2f} ms a client)  "
          f"activate {activate_ms:6.2f} ms  clients' modules: {held_mb:6.1f} MB resident for {tensor_mb:5.2f} MB "
          f"of tensors", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--clients", type=int, nargs="+", default=[12, 120, 1200])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this size here
    a = p.parse_args()
    if a.one:
        measure(a.model, a.one)
        return
    for n in a.clients:
        subprocess.run([sys.executable, __file__, "--model", a.model, "--one", str(n)], check=True)


if __name__ == "__main__":
    main()
