"""`atlas bench`: seconds per round by phase, throughput, padding and peak memory of a named workload, each
beside a plain sequential PyTorch loop (the measuring is `atlasfl.bench`). Figures are printed, never asserted."""
from __future__ import annotations

import warnings
from typing import List, Optional

import typer

from atlasfl.bench import SCALING
from atlasfl.cli.options import split_values
from atlasfl.errors import AtlasError


def bench(
    workload: str = typer.Argument("identical", help="identical (MiniLM) | random (full-size random presets)"),
    data_dir: Optional[str] = typer.Option(None, help="GLUE-shaped folder (../shared/bench/make_glue_shaped.py)."),
    models: Optional[List[str]] = typer.Option(
        None, "--model", help="random: preset models, --init random (default distilbert); --scaling: the models "
        "swept (default tiny-bert minilm distilbert; all but minilm random)."),
    rounds: int = typer.Option(2, help="Rounds timed (each: the plain loop, then ATLAS, alternately)."),
    group_by_length: bool = typer.Option(False, help="ATLAS also with length-grouped training batches (a run's "
                                         "default; the 'ungrouped' rows take the plain loop's batches)."),
    client_batch_rows: Optional[int] = typer.Option(
        None, min=1, help="Client-batched rows: at most this many rows per forward pass (default: all; with "
        f"--scaling {SCALING['client_batch_rows']}, as all 48 or 96 clients in one pass would not fit in memory)."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)."),
    scaling: bool = typer.Option(False, help="12/48/96 clients for tiny-bert, minilm, distilbert (random)."),
    clients_per_task: Optional[List[int]] = typer.Option(
        None, min=1, help="--scaling: clients per task of each step (default 3 12 24: 12, 48, 96 clients). One "
        "model and one size per call gives each its own peak memory."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    methods: Optional[List[str]] = typer.Option(
        None, help="Instead of the plain loop: these methods' federations on the workload, one round of each in "
        "turn; seconds and bytes per round, and seconds as a multiple of the first method's (say standard_fl "
        "first). Space- or comma-separated."),
):
    """Time a workload: s/round by phase, examples/s and real tokens/s, padding, peak memory, ratio to a plain loop."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from atlasfl.bench import IDENTICAL, bench_rows, scaling_settings
    from atlasfl.results.build import peak_memory

    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    if threads:
        torch.set_num_threads(threads)
    if workload not in ("identical", "random"):
        raise AtlasError(f"unknown workload {workload!r}; choose identical or random")
    if methods:
        return _method_table(workload, data_dir, rounds, threads, device, split_values(methods))
    if scaling:
        client_batch_rows = client_batch_rows or SCALING["client_batch_rows"]
        runs = [(m, scaling_settings(m, c))
                for m in models or SCALING["models"] for c in clients_per_task or SCALING["clients"]]
    elif workload == "identical":
        runs = [("minilm", {})]
    else:
        runs = [(m, dict(init="random")) for m in models or ["distilbert"]]
    table = Table(title=f"atlas bench {workload}{' --scaling' if scaling else ''} (torch threads "
                        f"{torch.get_num_threads()})")
    for col in ("model", "clients", "loop", "train s/rd", "agg s/rd", "eval s/rd", "total s/rd", "train ex/s",
                "train tok/s", "eval ex/s", "eval tok/s", "padding %", "plain/ours"):
        table.add_column(col, justify="left" if col in ("model", "loop") else "right")
    for model, overrides in runs:
        settings = dict(IDENTICAL, data_dir=data_dir, device=device, group_by_length=group_by_length,
                        client_batch_rows=client_batch_rows, **dict(dict(rounds=rounds), **overrides))
        for row in bench_rows(model, settings):
            table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    peak, measured_by = peak_memory(_device(device))
    console.print(f"peak memory of the process (both loops): {peak / 1e9:.2f} GB, {measured_by}. tok/s counts real "
                  "(non-padding) tokens; padding % is of the token positions computed. Same process, alternating "
                  "rounds: compare the ratio, not the seconds, on a shared machine.", markup=False, highlight=False)


def _method_table(workload: str, data_dir: str | None, rounds: int, threads: int, device: str,
                  methods: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from atlasfl.bench import IDENTICAL, method_rows
    from atlasfl.config import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or workload != "identical":
        raise AtlasError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}" if unknown else
                         "--methods runs the identical workload only")
    table = Table(title=f"atlas bench identical --methods (torch threads {threads or 'default'})")
    for col in ("model", "method", "clients", "train s/rd", "agg s/rd", "eval s/rd", "total s/rd",
                "bytes up/client/rd", "bytes down/client/rd", f"s/rd vs {methods[0]}"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    settings = dict(IDENTICAL, data_dir=data_dir, device=device, rounds=rounds)
    for row in method_rows("minilm", settings, methods):
        table.add_row(*row)
    Console(width=200).print(table)
    Console(width=200).print("Same process, one round of each method in turn, the order flipped every round: "
                             "compare the ratio, not the seconds, on a shared machine.", markup=False,
                             highlight=False)


def _device(device: str) -> str:
    from atlasfl.models.registry import resolve_device

    return resolve_device(device)


