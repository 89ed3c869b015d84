#!/usr/bin/env python
"""Seconds per round and peak memory of one configuration, for speed/memory figures (GPU sessions too).

    python benchmarks/round_time.py distilbert gpt2 qwen2.5 --init random --tasks offline --rounds 1

Each model runs `fedavg_cluster` with seed 42 and writes nothing outside a temporary folder; full-size
random weights (`--init random`) are valid here because speed does not depend on the weights."""
from __future__ import annotations

import argparse
import tempfile
import warnings

from atlasfl.config import build_config
from atlasfl.engines.inprocess import run_experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--method", default="fedavg_cluster")
    p.add_argument("--init", default="random", choices=("pretrained", "random"))
    p.add_argument("--tasks", nargs="+", default=["offline"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mode", default="full", choices=("quick", "full"))
    p.add_argument("--max-samples", type=int)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not results
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    print(f"{'model':<12} {'device':<6} {'s/round':>9} {'setup s':>8} {'peak GB':>8}  measured by")
    for model in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(model, 42, a.method, init=a.init, tasks=tuple(a.tasks), rounds=a.rounds, mode=a.mode,
                               max_samples=a.max_samples, device=a.device, output_dir=tmp, log_dir=tmp,
                               checkpoint_dir=tmp)
            r = run_experiment(cfg, progress=False)
        per_round = sum(r["time_metrics"]["per_round_s"]) / len(r["time_metrics"]["per_round_s"])
        print(f"{model:<12} {r['environment']['device']:<6} {per_round:>9.1f} {r['time_metrics']['setup_s']:>8.1f} "
              f"{r['memory']['peak_measured_bytes'] / 1e9:>8.2f}  {r['memory']['measured_by']}", flush=True)


if __name__ == "__main__":
    main()
