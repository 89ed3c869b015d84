#!/usr/bin/env python
"""Does a speed option (a boolean setting such as --group-by-length or --client-batching) change results beyond
seed noise? The same small MiniLM run with and without it on a few seeds; prints the task mean, the training
padding share and train s/round of each (same process).

    python benchmarks/option_seeds.py --option client_batching --data-dir bench-data/glue-shaped --seeds 42 123 456
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np

from atlasfl.config import RunConfig, build_config
from atlasfl.engines.inprocess import run_experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", default="group_by_length",
                   choices=[n for n, f in RunConfig.model_fields.items() if f.annotation is bool])
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="fedavg_cluster")
    p.add_argument("--data-dir")
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "cola", "qnli"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 123, 456])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=111)
    a = p.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    scores = {False: [], True: []}
    print(f"{'seed':>5} {a.option:>16} {'task mean':>10} {'train pad %':>12} {'train s/rd':>11}")
    for seed in a.seeds:
        for on in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = build_config(a.model, seed, a.method, tasks=tuple(a.tasks), data_dir=a.data_dir, rounds=a.rounds,
                                   local_epochs=1, batch_size=16, lr=2e-5 if a.model == "minilm" else None,
                                   max_samples=a.max_samples, max_test_samples=200, fingerprint_samples=20,
                                   output_dir=tmp, log_dir=tmp, checkpoint_dir=tmp, **{a.option: on})
                r = run_experiment(cfg, progress=False)
            t = r["time_metrics"]["totals"]
            scores[on].append(r["final_metrics"]["task_mean"])
            print(f"{seed:>5} {on!s:>16} {scores[on][-1]:>10.4f} "
                  f"{100 * (1 - t['train']['real_tokens'] / t['train']['padded_tokens']):>12.1f} "
                  f"{t['train_s'] / t['rounds']:>11.1f}", flush=True)
    diff = np.array(scores[True]) - np.array(scores[False])
    per_seed = ", ".join(f"{d:+.4f}" for d in diff)
    print(f"task mean, with {a.option} - without: {diff.mean():+.4f} (per seed {per_seed}); "
          f"seed std without {np.std(scores[False], ddof=1):.4f}")


if __name__ == "__main__":
    main()
