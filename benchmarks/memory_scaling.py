#!/usr/bin/env python
"""Does memory grow with a copy of the base per client? The resident memory of ATLAS's own path (set-up,
phases 1-2, then rounds of `atlas`, one client after another) at a number of clients, in a fresh process
per size so each peak is its own. `atlas bench --scaling` gives the speed; its peak memory also holds the
plain loop's second base and the client-batched pass, whose activations grow with the clients in a pass.

    python benchmarks/memory_scaling.py --model minilm --clients-per-task 3 12 24 --data-dir bench-data/glue-shaped
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import warnings


def current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def measure(model: str, clients_per_task: int, data_dir: str, rounds: int) -> None:
    """One size in this process: print the memory after each stage."""
    warnings.simplefilter("ignore")
    import torch

    from atlasfl.bench import IDENTICAL, scaling_settings
    from atlasfl.config import build_config
    from atlasfl.engines.inprocess import set_up
    from atlasfl.federation.driver import RunProgress, plan_or_restore, run_round
    from atlasfl.methods import method_for
    from atlasfl.results.build import peak_memory

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(IDENTICAL, **scaling_settings(model, clients_per_task))
        settings["rounds"] = rounds
        cfg = build_config(model, 42, "atlas", data_dir=data_dir, output_dir=tmp, log_dir=tmp, checkpoint_dir=tmp,
                           **settings)
        stages = {"imports": current_mb()}
        transport = set_up(cfg)
        stages["set-up"] = current_mb()
        fed = plan_or_restore(cfg, method_for(cfg), transport, None)
        stages["phases 1-2, adapters built"] = current_mb()
        for r in range(1, rounds + 1):
            with RunProgress(False) as bars:
                run_round(fed, r, bars)
        stages[f"after {rounds} rounds"] = current_mb()
        states = transport.states().values()
        adapter_mb = sum(t.numel() * t.element_size() for s in states for t in s.values()) / 1e6
    cells = "  ".join(f"{k}: {v:.0f}" for k, v in stages.items())
    print(f"{model:10} {len(transport.shards):>4} clients  resident MB  {cells}  "
          f"peak: {peak_memory('cpu')[0] / 1e6:.0f}  adapters and heads of all clients: {adapter_mb:.1f} MB",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--clients-per-task", type=int, nargs="+", default=[3, 12, 24])
    p.add_argument("--data-dir", required=True, help="GLUE-shaped folder (../shared/bench/make_glue_shaped.py)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: measure one size here
    a = p.parse_args()
    if a.one:
        measure(a.model, a.clients_per_task[0], a.data_dir, a.rounds)
        return
    for c in a.clients_per_task:
        subprocess.run([sys.executable, __file__, "--one", "--model", a.model, "--clients-per-task", str(c),
                        "--data-dir", a.data_dir, "--rounds", str(a.rounds)], check=True)


if __name__ == "__main__":
    main()
