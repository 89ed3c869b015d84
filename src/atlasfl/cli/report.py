"""`atlas report`: tables, paired tests and plots over result files (the `atlasfl.report` library)."""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console


class Protocol(StrEnum):
    both = "both"
    global_ = "global"
    personal = "personal"


def report(
    results: List[str] = typer.Argument(..., help="Result JSON files or folders of them (ours or the predecessor's)."),
    out: str = typer.Option("reports", help="Folder for report.md, report.tex and the CSV tables."),
    baseline: List[str] = typer.Option(["local_only"], help="Methods every other method is compared with, seed by "
                                                            "seed: one paired table each (space- or comma-separated)."),
    plots: Optional[str] = typer.Option(None, help="Also write PNG plots into this folder."),
    protocol: Protocol = typer.Option("both", help="Test sets to report: global (each client on its task's test "
                                                   "set), personal (on its own label mix) or both."),
):
    """Tables over result files: scores per task with majority/chance references, costs, paired tests against a
    baseline, on the global and the personal protocol; optional plots."""
    from atlasfl.cli.options import split_values
    from atlasfl.report.load import load_results
    from atlasfl.report.records import PROTOCOLS
    from atlasfl.report.render import to_rich, write_report
    from atlasfl.report.tables import build_tables

    protocols = PROTOCOLS if protocol == "both" else (protocol.value,)
    records = load_results(results)
    tables = build_tables(records, split_values(baseline), protocols)
    console = Console()
    for table in tables:
        console.print(to_rich(table))
        for note in table.notes:
            console.print(note, style="dim", markup=False, highlight=False)
        console.print()
    written = write_report(tables, Path(out))
    if plots:
        from atlasfl.report.plots import write_plots

        written += write_plots(records, Path(plots), protocols)
    console.print(f"{len(records)} result file(s); wrote " + ", ".join(map(str, written)),
                  markup=False, highlight=False)
