#!/usr/bin/env python
"""Seconds per round of one federation deployed on Flower over loopback (a SuperLink and one SuperNode per
client, as `tests/integration/test_flower_deployment.py` starts them), with the ClientApp's resident workers
(`keep-alive-s`, the default) and without them (`keep-alive-s=0`: every message in a fresh `flwr-clientapp`
process), with TLS and SuperNode authentication (`secure`, as the deployment guide starts it), beside the same
run on Flower's Simulation Runtime and in-process.

    python benchmarks/flower_deployment.py                 # the deployment test's configuration, 3 rounds
    python benchmarks/flower_deployment.py --rounds 5 --method fedavg_cluster --only resident fresh
    python benchmarks/flower_deployment.py --only resident secure resident secure   # what TLS and auth cost

The runs take turns in this one process's session on the same machine, so compare their ratios; every
process started for a deployment is torn down before the next run. Prints one line per run: the result's
`per_round_s`, their mean, the wall seconds from submission to the result file, and for resident workers the
seconds they spent answering messages (the rest of a deployed round is Flower's: its polls and processes).
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the deployment test's loopback harness

from atlasfl.config import build_config  # noqa: E402
from atlasfl.experiment import run_and_save  # noqa: E402
from tests.integration.test_flower_deployment import CLIENTS, OVERRIDES, RUN, Loopback  # noqa: E402


def deployed(folder: Path, method: str, rounds: int, node_config: str,
             secure: bool = False) -> tuple[list[float], float, str]:
    with Loopback(folder, deadline_s=3600, secure=secure) as loop:
        for i, port in enumerate(loop.node_ports):
            loop.node(i, port, node_config)
        start = time.monotonic()
        result = loop.finish(loop.submit(method, method=method, rounds=rounds),
                             f"atlas_{RUN['model']}_{method}_seed0_r{rounds}")
        wall = time.monotonic() - start
    answered = [float(s) for text in loop.worker_logs for s in re.findall(r"answered in ([\d.]+) s", text)]
    note = (f" | workers: {len(loop.worker_logs)}, {len(answered)} messages, {sum(answered):.1f} s answering them"
            if answered else "")
    return result["time_metrics"]["per_round_s"], wall, note


def local(folder: Path, method: str, rounds: int, engine: str) -> tuple[list[float], float, str]:
    tasks = tuple(RUN["tasks"].split())
    cfg = build_config(RUN["model"], 0, method, mode=RUN["mode"], tasks=tasks, rounds=rounds, engine=engine,
                       output_dir=str(folder / "results"), checkpoint_dir=str(folder / "checkpoints"),
                       log_dir=str(folder / "logs"), **OVERRIDES)
    start = time.monotonic()
    result, _ = run_and_save(cfg, progress=False)
    return result["time_metrics"]["per_round_s"], time.monotonic() - start, ""


RUNS = {"resident": lambda d, method, rounds: deployed(d, method, rounds, ""),
        "fresh": lambda d, method, rounds: deployed(d, method, rounds, "keep-alive-s=0"),
        "secure": lambda d, method, rounds: deployed(d, method, rounds, "", secure=True),
        "simulation": lambda d, method, rounds: local(d, method, rounds, "flower"),
        "inprocess": lambda d, method, rounds: local(d, method, rounds, "inprocess")}
LABELS = {"resident": "deployed, resident workers", "fresh": "deployed, keep-alive-s=0",
          "secure": "deployed, TLS + node auth",
          "simulation": "simulation (Ray)", "inprocess": "in-process"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="atlas")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=list(RUNS),
                   help="these runs alone, in this order (a name may repeat; default: each once)")
    a = p.parse_args()
    print(f"{RUN['model']}, {a.method}, {CLIENTS} clients, {a.rounds} rounds (tests/integration/"
          "test_flower_deployment.py's configuration)")
    for name in a.only or RUNS:
        with tempfile.TemporaryDirectory() as folder:
            per_round, wall, note = RUNS[name](Path(folder), a.method, a.rounds)
        seconds = " ".join(f"{s:6.1f}" for s in per_round)
        mean = statistics.mean(per_round)
        print(f"{LABELS[name]:28s} s/round {seconds} | mean {mean:6.1f} | wall {wall:6.1f} s{note}", flush=True)


if __name__ == "__main__":
    main()
