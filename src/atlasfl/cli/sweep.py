"""`atlas sweep`: a grid of MODELS × METHODS × SEEDS over the one run implementation."""
from __future__ import annotations

from typing import List

import typer
from rich.console import Console

from atlasfl.cli.options import parse_seed, split_values, with_overrides
from atlasfl.config import METHODS
from atlasfl.errors import AtlasError
from atlasfl.sweep import grid_configs, run_sweep


class SweepFailed(AtlasError):
    """Some runs of a sweep failed: exit 1 (the grid itself was valid) after the others completed."""

    exit_code = 1


@with_overrides(exclude=("engine",))
def sweep(
    models: List[str] = typer.Option(..., help="Models: space- or comma-separated, or repeat the flag."),
    methods: List[str] = typer.Option(..., help=f"Methods ({' | '.join(METHODS)}): space- or comma-separated."),
    seeds: List[str] = typer.Option(..., help="Seeds: space- or comma-separated non-negative integers."),
    overwrite: bool = typer.Option(False, help="Re-run and replace results that are already complete."),
    overrides: dict | None = None,
):
    """Run a grid of MODELS × METHODS × SEEDS, skipping complete results; failed runs are listed at the end."""
    configs = grid_configs(split_values(models), split_values(methods), [parse_seed(s) for s in split_values(seeds)],
                           **overrides)
    console = Console(soft_wrap=True)  # one line per run, whatever the terminal width
    outcome = run_sweep(configs, overwrite=overwrite,
                        say=lambda line: console.print(line, markup=False, highlight=False))
    console.print(f"sweep: {len(configs)} runs: {len(outcome.ran)} ran, {len(outcome.skipped)} already complete, "
                  f"{len(outcome.failed)} failed", markup=False, highlight=False)
    for name, reason in outcome.failed:
        console.print(f"  FAILED {name}: {reason}", markup=False, highlight=False)
    if outcome.failed:
        raise SweepFailed(f"{len(outcome.failed)} of {len(configs)} runs failed (listed above); fix them and run the "
                          "same sweep again: complete runs are skipped")
