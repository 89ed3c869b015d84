"""`atlas sweep`: a grid of MODELS × METHODS × SEEDS over the one run implementation."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console

from atlasfl.cli.options import CONFIG_HELP, merge_config_file, parse_seed, split_values, with_overrides
from atlasfl.cli.tune import DEV_SEED
from atlasfl.config import METHODS, overridable_settings
from atlasfl.errors import AtlasError
from atlasfl.sweep import grid_configs, run_sweep


class SweepFailed(AtlasError):
    """Some runs of a sweep failed: exit 1 (the grid itself was valid) after the others completed."""

    exit_code = 1


GRID = ("models", "methods", "seeds")


def _grid_values(value) -> list[str]:
    """A grid axis from a flag (a list of strings) or a config file (a TOML array, or one string or number)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return split_values([str(item) for item in items])


@with_overrides(exclude=("engine",))
def sweep(
    models: Optional[List[str]] = typer.Option(None, help="Models: space- or comma-separated, or repeat the flag.",
                                               show_default=False),
    methods: Optional[List[str]] = typer.Option(
        None, help=f"Methods ({' | '.join(METHODS)}): space- or comma-separated.", show_default=False),
    seeds: Optional[List[str]] = typer.Option(None, help="Seeds: space- or comma-separated non-negative integers.",
                                              show_default=False),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP.format(keys="models, methods, seeds")),
    overwrite: bool = typer.Option(False, help="Re-run and replace results that are already complete."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Runs at once, each an `atlas run` process with its share "
                             "of the CPU threads and its log in LOG_DIR/sweep/."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="--jobs: GPUs to give the runs, round robin by "
                                       "CUDA_VISIBLE_DEVICES, e.g. 0,1,2.", show_default=False),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="Run the grid's runs as tasks on a Ray cluster (auto, HOST:PORT or "
        "ray://HOST:PORT), --jobs at once, each with the cluster's CPUs // jobs and, with --gpus, one GPU; files "
        "go to the paths the settings name, on the node that ran the run (docs/reports.md).", show_default=False),
    overrides: dict | None = None,
):
    """Run a grid of MODELS × METHODS × SEEDS, skipping complete results; failed runs are listed at the end."""
    keys = [*GRID, *(n for n in overridable_settings() if n != "engine")]
    settings = merge_config_file(config, keys, dict(models=models or None, methods=methods or None,
                                                    seeds=seeds or None) | overrides)
    grid = {}
    for name in GRID:
        values = _grid_values(settings.pop(name, None))
        if not values:
            raise AtlasError(f"Missing option '--{name}': give it on the command line or as `{name} = [...]` "
                             "in a --config file")
        grid[name] = values
    seeds = [parse_seed(s) for s in grid["seeds"]]
    if settings.get("tune"):  # every method the same trials on one development seed, not a reported one
        settings["tune_seed"] = DEV_SEED if settings.get("tune_seed") is None else settings["tune_seed"]
        if settings["tune_seed"] in seeds:
            raise AtlasError(f"--tune-seed {settings['tune_seed']} is also a reported seed: tune on a development "
                             "seed the sweep does not report (--tune-seed N)")
    configs = grid_configs(grid["models"], grid["methods"], seeds, **settings)
    console = Console(soft_wrap=True)  # one line per run, whatever the terminal width
    if jobs > 1 or gpus or ray_address:
        outcome = run_parallel(configs, jobs, split_values([gpus] if gpus else []), overwrite, console, ray_address)
    else:
        outcome = run_sweep(configs, overwrite=overwrite,
                            say=lambda line: console.print(line, markup=False, highlight=False))
    console.print(f"sweep: {len(configs)} runs: {len(outcome.ran)} ran, {len(outcome.skipped)} already complete, "
                  f"{len(outcome.failed)} failed", markup=False, highlight=False)
    for name, reason in outcome.failed:
        console.print(f"  FAILED {name}: {reason}", markup=False, highlight=False)
    if outcome.failed:
        raise SweepFailed(f"{len(outcome.failed)} of {len(configs)} runs failed (listed above); fix them and run the "
                          "same sweep again: complete runs are skipped")


def run_parallel(configs, jobs: int, gpus: list[str], overwrite: bool, console: Console, ray_address: str | None):
    """`--jobs N`: the runs as processes (or Ray tasks), with a live table of their states."""
    from rich.live import Live
    from rich.table import Table

    from atlasfl.jobs import launch, ray_launcher, run_jobs

    start = ray_launcher(ray_address, jobs, bool(gpus)) if ray_address else launch

    def table(queue) -> Table:
        t = Table(title=f"sweep: {len(queue)} runs, {jobs} at once" + (f" on Ray at {ray_address}" if ray_address
                                                                            else ""))
        for col in ("run", "state", "seconds", "log"):
            t.add_column(col)
        for job in queue:
            t.add_row(job.cfg.run_name, job.state, f"{job.seconds:.0f}" if job.seconds else "",
                      str(job.log) if job.state not in ("waiting", "skipped") else "")
        return t

    with Live(console=console, auto_refresh=False) as live:
        return run_jobs(configs, jobs=jobs, gpus=gpus, overwrite=overwrite, start=start,
                        show=lambda queue: live.update(table(queue), refresh=True))
