"""`atlas run`, `atlas demo` and `atlas presets`: one experiment, atlas beside its baselines offline, the presets."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from atlasfl.cli.options import CONFIG_HELP, merge_config_file, parse_seed, with_overrides
from atlasfl.config import METHODS, POSITIONAL, build_config, overridable_settings
from atlasfl.errors import AtlasError
from atlasfl.experiment import run_and_save
from atlasfl.federation.records import ambiguity_warning
from atlasfl.presets import PRESETS


@with_overrides()
def run(
    model: Optional[str] = typer.Argument(
        None, help="distilbert | gpt2 | gpt2-xl | qwen2.5 | minilm | tiny-* | HF id | folder", show_default=False),
    seed: Optional[str] = typer.Argument(None, help="Random seed (non-negative integer).", show_default=False),
    method: Optional[str] = typer.Argument(None, help=" | ".join(METHODS), show_default=False),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP.format(keys="model, seed, method")),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last complete checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete result JSON."),
    overrides: dict | None = None,
):
    """Run one experiment: MODEL SEED METHOD (or from --config FILE)."""
    given = dict(model=model, seed=seed, method=method)
    settings = merge_config_file(config, [*POSITIONAL, *overridable_settings()], given | overrides)
    for name in POSITIONAL:
        if settings.get(name) is None:
            raise AtlasError(f"Missing argument '{name.upper()}': give MODEL SEED METHOD on the command line "
                             f"or `{name} = ...` in a --config file")
    cfg = build_config(str(settings.pop("model")), parse_seed(str(settings.pop("seed"))), str(settings.pop("method")),
                       **settings)
    result, path = run_and_save(cfg, overwrite=overwrite, resume=resume)
    print_summary(result, path)


def demo(output_dir: str = typer.Option("results/demo", help="Folder for the result JSONs."),
         overwrite: bool = typer.Option(False, help="Train every method afresh instead of reading back finished "
                                                    "ones.")):
    """ATLAS beside local_only and fedavg_cluster on the packaged MiniLM and offline tasks (no model hub
    needed), then one comparison table. An interrupted demo continues where it stopped; a finished one
    prints its table again without training (unless --overwrite)."""
    from atlasfl.demo import compare, run_demo

    runs = run_demo(output_dir, overwrite=overwrite, say=lambda line: print(line, file=sys.stderr))
    print_comparison(compare({m: r for m, (r, _) in runs.items()}, {m: p for m, (_, p) in runs.items()}))


def print_comparison(comparison) -> None:
    table = Table(title="atlas demo: test scores on the personal protocol (mean of each task's clients)")
    for i, col in enumerate(comparison.header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in comparison.rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(comparison.sentence, markup=False, highlight=False)


def presets():
    """Print the per-model presets."""
    table = Table(title="ATLAS presets (rounds 10, tasks sst2 mrpc cola qnli, 3 clients/task, max 3000 samples/client)")
    for col in ("model", "batch", "lr", "epochs", "fingerprint samples", "rank candidates", "notes"):
        table.add_column(col)
    for p in PRESETS.values():
        table.add_row(p.model, str(p.batch_size), f"{p.lr:g}", str(p.local_epochs), str(p.fingerprint_samples),
                      ",".join(map(str, p.rank_candidates)), p.notes)
    Console().print(table)


def print_summary(result: dict, path) -> None:
    table = Table(title=f"{result['run_name']}: final test metrics (mean of each task's clients)")
    for col in ("task", "metric", "score", "accuracy", "clients"):
        table.add_column(col)
    for task, m in result["final_metrics"]["per_task"].items():
        table.add_row(task, m["metric_name"], f"{m['score']:.4f}", f"{m['accuracy']:.4f}", str(m["num_clients"]))
    table.add_row("mean", "", f"{result['final_metrics']['task_mean']:.4f}", "", "")
    console = Console()
    console.print(table)
    console.print(f"clusters: {result['cluster_labels']} ({result['cluster_source']}); "
                  f"time {result['time_metrics']['total_s']:.1f}s")
    ambiguity = ambiguity_warning(result.get("phase1_clustering"))
    if ambiguity:
        console.print(ambiguity, style="bold yellow", markup=False, highlight=False)
    look = result.get("second_look")
    if look and look["labels"] is not None:
        console.print(f"second look after round 1: clusters {look['phase1_labels']} -> {look['labels']} from round "
                      f"{look['effective_from_round']} (ARI {look['phase1_ari']:.3f} -> {look['ari']:.3f}; "
                      f"{look['extra_bytes_up']} extra bytes up)", markup=False, highlight=False)
    elif look:
        console.print(f"second look skipped: {look['skipped']}", markup=False, highlight=False)
    if result.get("diverged_clients"):
        console.print(f"DIVERGED: clients {result['diverged_clients']} (training loss blew up; see the warnings "
                      "above and lower --lr)", style="bold red", markup=False, highlight=False)
    console.print(f"result: {path}")
