#!/usr/bin/env python
"""Does memory grow with a copy of the base per client, and does a round's time follow the cohort or the
population? The resident memory of ATLAS's own path (set-up, phases 1-2, then rounds, one client after another)
at a number of clients, in a fresh process per size so each peak is its own, and each round's seconds by phase.
`atlas bench --scaling` gives the speed of every client training; its peak memory also holds the plain loop's
second base and the client-batched pass, whose activations grow with the clients in a pass.

    python benchmarks/memory_scaling.py --model minilm --clients-per-task 3 12 24 --data-dir bench-data/glue-shaped
    python benchmarks/memory_scaling.py --model tiny-bert --tasks offline --clients-per-task 4 40 400 \
        --clients-per-round 12 --rounds 3 --max-samples 8 --method fedavg_cluster

With `--clients-per-round m` only a seeded cohort of m trains in a round; every client is tested in the first and
the last round (a run's rule) and only the cohort in the rounds between, so a middle round is the cohort's cost.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings


def measure(a) -> None:
    """One size in this process: print the memory after each stage and each round's seconds by phase."""
    warnings.simplefilter("ignore")
    import torch

    from atlasfl.bench import IDENTICAL, scaling_settings
    from atlasfl.config import build_config
    from atlasfl.engines.inprocess import set_up
    from atlasfl.federation.driver import RunProgress, plan_or_restore, run_round
    from atlasfl.heap import resident_mb
    from atlasfl.methods import method_for
    from atlasfl.results.build import peak_memory

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(IDENTICAL, **scaling_settings(a.model, a.clients_per_task[0]))
        settings["rounds"] = a.rounds
        if a.tasks:
            settings["tasks"] = tuple(a.tasks)
        for key in ("max_samples", "max_test_samples", "clients_per_round"):
            if getattr(a, key) is not None:
                settings[key] = getattr(a, key)
        cfg = build_config(a.model, 42, a.method, data_dir=a.data_dir, output_dir=tmp, log_dir=tmp,
                           checkpoint_dir=tmp, **settings)
        stages = {"imports": resident_mb()}
        transport = set_up(cfg)
        stages["set-up"] = resident_mb()
        t0 = time.perf_counter()
        fed = plan_or_restore(cfg, method_for(cfg), transport, None)
        plan_s = time.perf_counter() - t0
        stages["phases 1-2, adapters built"] = resident_mb()
        rounds = []
        for r in range(1, a.rounds + 1):
            with RunProgress(False) as bars:
                entry = run_round(fed, r, bars)
            fed.rounds.append(entry)
            rounds.append(entry)
        stages[f"after {a.rounds} rounds"] = resident_mb()
        states = transport.states().values()
        adapter_mb = sum(t.numel() * t.element_size() for s in states for t in s.values()) / 1e6
    cells = "  ".join(f"{k}: {v:.0f}" for k, v in stages.items())
    print(f"{a.model:10} {len(transport.shards):>5} clients  resident MB  {cells}  "
          f"peak: {peak_memory('cpu')[0] / 1e6:.0f}  adapters and heads of all clients: {adapter_mb:.2f} MB  "
          f"phases 1-2: {plan_s:.1f} s", flush=True)
    for e in rounds:
        c, took_part = e["cost"], len(e.get("participants") or transport.shards)
        print(f"{'':10} {len(transport.shards):>5} clients  round {e['round']}: {took_part} trained, "
              f"{c['evaluate']['examples']} test examples  train {c['train_s']:.2f} s  aggregate "
              f"{c['aggregate_s']:.2f} s  evaluate {c['evaluate_s']:.2f} s  total "
              f"{c['train_s'] + c['aggregate_s'] + c['evaluate_s']:.2f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="atlas")
    p.add_argument("--clients-per-task", type=int, nargs="+", default=[3, 12, 24])
    p.add_argument("--clients-per-round", type=int, help="a seeded cohort of m clients per round (default: all)")
    p.add_argument("--tasks", nargs="+", help="default: the identical workload's GLUE-shaped tasks")
    p.add_argument("--data-dir", help="GLUE-shaped folder (../shared/bench/make_glue_shaped.py), for GLUE tasks")
    p.add_argument("--max-samples", type=int, help="training examples per client (default: the scaling sweep's)")
    p.add_argument("--max-test-samples", type=int)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: measure one size here
    a = p.parse_args()
    if a.one:
        measure(a)
        return
    for c in a.clients_per_task:  # the last --clients-per-task given is the one argparse keeps
        subprocess.run([sys.executable, __file__, "--one", *sys.argv[1:], "--clients-per-task", str(c)], check=True)


if __name__ == "__main__":
    main()
