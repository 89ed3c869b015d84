"""`atlas report` and `atlas sweep`, added to the typer app by `register(app)` (called from cli.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand

from atlasfl.config import METHODS
from atlasfl.errors import AtlasError
from atlasfl.options import split_values, with_overrides

LIST_OPTIONS = ("--models", "--methods", "--seeds", "--tasks", "--devices")


class SweepFailed(AtlasError):
    """Some runs of a sweep failed: exit 1 (the grid itself was valid) after the others completed."""

    exit_code = 1


def spread_list_options(args: list[str], names=LIST_OPTIONS) -> list[str]:
    """`--methods a b c` → `--methods a --methods b --methods c`: a list option takes every value up to
    the next option, so grids read as they are written (repeating the flag works too)."""
    out: list[str] = []
    current, first = None, True
    for arg in args:
        if arg.startswith("-"):
            current, first = (arg if arg in names else None), True
        elif current is not None:
            if not first:
                out.append(current)
            first = False
        out.append(arg)
    return out


class _ListOptionsCommand(TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, spread_list_options(args))


def report(
    results: List[str] = typer.Argument(..., help="Result JSON files or folders of them (ours or the predecessor's)."),
    out: str = typer.Option("reports", help="Folder for report.md, report.tex and the CSV tables."),
    baseline: str = typer.Option("local_only", help="Method every other method is compared with, seed by seed."),
    plots: Optional[str] = typer.Option(None, help="Also write PNG plots into this folder."),
):
    """Tables over result files: scores per task, costs, paired tests against a baseline; optional plots."""
    from atlasfl.report.load import load_results
    from atlasfl.report.render import to_rich, write_report
    from atlasfl.report.tables import build_tables

    records = load_results(results)
    tables = build_tables(records, baseline)
    console = Console()
    for table in tables:
        console.print(to_rich(table))
        for note in table.notes:
            console.print(note, style="dim", markup=False, highlight=False)
        console.print()
    written = write_report(tables, Path(out))
    if plots:
        from atlasfl.report.plots import write_plots

        written += write_plots(records, Path(plots))
    console.print(f"{len(records)} result file(s); wrote " + ", ".join(map(str, written)), markup=False, highlight=False)


def sweep(
    models: List[str] = typer.Option(..., help="Models: space- or comma-separated, or repeat the flag."),
    methods: List[str] = typer.Option(..., help=f"Methods ({' | '.join(METHODS)}): space- or comma-separated."),
    seeds: List[str] = typer.Option(..., help="Seeds: space- or comma-separated non-negative integers."),
    overwrite: bool = typer.Option(False, help="Re-run and replace results that are already complete."),
    overrides: dict | None = None,
):
    """Run a grid of MODELS × METHODS × SEEDS, skipping complete results; failed runs are listed at the end."""
    from atlasfl.cli import _seed
    from atlasfl.sweep import grid_configs, run_sweep

    configs = grid_configs(split_values(models), split_values(methods), [_seed(s) for s in split_values(seeds)],
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


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("sweep", cls=_ListOptionsCommand)(with_overrides(exclude=("engine",))(sweep))
