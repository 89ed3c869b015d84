#!/usr/bin/env python
"""Seed interface: `python experiments/atlas_integrated.py --mode full --model gpt2 --ablation atlas --seed 42`.

A thin wrapper over the same implementation as `atlas run` (atlasfl.experiment.run_and_save)."""
from __future__ import annotations

import argparse
import sys

from atlasfl.cli.app import main as atlas_main
from atlasfl.config import METHODS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit
        print(f"atlas_integrated.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: list[str]) -> list[str]:
    p = _Parser(description=__doc__)
    p.add_argument("--mode", choices=("quick", "full"), default="full")
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--ablation", choices=METHODS, default="atlas", help="method to run")
    p.add_argument("--seed", default="42")
    p.add_argument("--rounds", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lambda-sweep", action="store_true")
    p.add_argument("--fingerprint-samples", type=int)
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--output-dir")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    args = ["run", a.model, a.seed, a.ablation, "--mode", a.mode]
    for flag, value in (("--rounds", a.rounds), ("--batch-size", a.batch_size), ("--lr", a.lr),
                        ("--fingerprint-samples", a.fingerprint_samples), ("--output-dir", a.output_dir)):
        if value is not None:
            args += [flag, str(value)]
    for t in a.tasks or []:
        args += ["--tasks", t]
    if a.lambda_sweep:
        args.append("--lambda-sweep")
    if a.overwrite:
        args.append("--overwrite")
    return args


if __name__ == "__main__":
    sys.exit(atlas_main(parse(sys.argv[1:])))
