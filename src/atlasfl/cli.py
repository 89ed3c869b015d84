"""The `atlas` command: a thin face over `atlasfl.experiment`. Errors in the user's input print one line
(and exit 2); `--debug` shows the traceback instead."""
from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from atlasfl.config import METHODS, build_config
from atlasfl.errors import AtlasError
from atlasfl.experiment import RunInterrupted, run_and_save
from atlasfl.presets import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ATLAS: multi-task federated LoRA fine-tuning experiments.")
_DEBUG = {"on": False}

# The embedded offline default: packaged MiniLM on the offline task set, sized for ~minutes on 2 CPU cores.
DEMO = dict(model="minilm", seed=42, method="atlas", tasks=("offline",), rounds=3, max_samples=240,
            max_test_samples=200, local_epochs=1, batch_size=16)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _DEBUG["on"] = debug


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise AtlasError(f"seed must be a non-negative integer, got {value!r}") from None
    if seed < 0:
        raise AtlasError(f"seed must be a non-negative integer, got {seed}")
    return seed


@app.command()
def run(
    model: str = typer.Argument(..., help="distilbert | gpt2 | gpt2-xl | qwen2.5 | minilm | tiny-* | HF id | folder"),
    seed: str = typer.Argument(..., help="Random seed (non-negative integer)."),
    method: str = typer.Argument(..., help=" | ".join(METHODS)),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (preset: 10)."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (AdamW)."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    max_samples: Optional[int] = typer.Option(None, help="Max training examples per client."),
    max_test_samples: Optional[int] = typer.Option(None, help="Cut each task's test set (default: all)."),
    fingerprint_samples: Optional[int] = typer.Option(None, help="Examples per client for fingerprints."),
    tasks: Optional[List[str]] = typer.Option(None, help="Tasks or task sets (glue, offline, generated)."),
    clients_per_task: Optional[int] = typer.Option(None, help="Clients per task (preset: 3)."),
    mode: str = typer.Option("full", help="quick (smoke sizes, 2 rounds) | full."),
    output_dir: Optional[str] = typer.Option(None, help="Folder for result JSONs (default: results)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    dirichlet_alpha: Optional[float] = typer.Option(None, help="Dirichlet label skew (default: IID)."),
    data_dir: Optional[str] = typer.Option(None, help="Local GLUE folder: DIR/<task>/train.* and validation.*"),
    init: Optional[str] = typer.Option(None, help="pretrained | random (full-size random weights, for benchmarks)."),
    eta: Optional[float] = typer.Option(None, help="Laplacian step size for atlas, in [0, 1] (default 0.1)."),
    lambda_sweep: bool = typer.Option(False, "--lambda-sweep", help="atlas: run the eta grid, pick eta by local validation."),
    aggregation: Optional[str] = typer.Option(None, help="svd | fedavg (default: svd for heterogeneous ranks)."),
    devices: Optional[List[str]] = typer.Option(None, help="Device profiles to draw from (cpu_2gb tablet_4gb laptop_8gb gpu_16gb)."),
    clusters: Optional[str] = typer.Option(None, help="fingerprint (default) | oracle (true task grouping)."),
    fingerprint: Optional[str] = typer.Option(None, help="representation (default) | gradient."),
    engine: Optional[str] = typer.Option(None, help="inprocess (default) | flower (the Flower app on Flower's Simulation Runtime)."),
    checkpoint_dir: Optional[str] = typer.Option(None, help="Folder for per-round checkpoints (default: checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last complete checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete result JSON."),
):
    """Run one experiment: MODEL SEED METHOD."""

    cfg = build_config(model, _seed(seed), method, rounds=rounds, batch_size=batch_size, lr=lr,
                       local_epochs=local_epochs, max_samples=max_samples, max_test_samples=max_test_samples,
                       fingerprint_samples=fingerprint_samples, tasks=tuple(tasks) if tasks else None,
                       clients_per_task=clients_per_task, mode=mode, output_dir=output_dir, device=device,
                       dirichlet_alpha=dirichlet_alpha, data_dir=data_dir, init=init, eta=eta,
                       lambda_sweep=lambda_sweep or None, aggregation=aggregation,
                       devices=tuple(devices) if devices else None, clusters=clusters, fingerprint=fingerprint, engine=engine,
                       checkpoint_dir=checkpoint_dir)
    result, path = run_and_save(cfg, overwrite=overwrite, resume=resume)
    print_summary(result, path)


@app.command()
def demo(output_dir: str = typer.Option("results", help="Folder for the result JSON."),
         overwrite: bool = typer.Option(True, help="Replace the previous demo result.")):
    """The embedded offline default: packaged MiniLM, offline tasks, 12 clients, no model hub needed."""

    d = dict(DEMO)
    cfg = build_config(d.pop("model"), d.pop("seed"), d.pop("method"), output_dir=output_dir, **d)
    result, path = run_and_save(cfg, overwrite=overwrite)
    print_summary(result, path)


@app.command()
def presets():
    """Print the per-model presets."""
    table = Table(title="ATLAS presets (rounds 10, tasks sst2 mrpc cola qnli, 3 clients/task, max 3000 samples/client)")
    for col in ("model", "batch", "lr", "epochs", "fingerprint samples", "rank candidates", "notes"):
        table.add_column(col)
    for p in PRESETS.values():
        table.add_row(p.model, str(p.batch_size), f"{p.lr:g}", str(p.local_epochs), str(p.fingerprint_samples),
                      ",".join(map(str, p.rank_candidates)), p.notes)
    Console().print(table)


from atlasfl.report.commands import register as _register_report  # noqa: E402
_register_report(app)


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
    console.print(f"result: {path}")


def _usage_message(exc) -> str:
    option = getattr(exc, "option_name", "") or ""
    if option.lstrip("-").isdigit():  # `atlas run MODEL -5 METHOD` parses -5 as an option
        return f"seed must be a non-negative integer, got {option}"
    return " ".join(exc.format_message().split())


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, exit 2 on bad input, 130 on interrupt."""
    try:
        app(args=argv, standalone_mode=False)
    except AtlasError as exc:
        if _DEBUG["on"]:
            raise
        print(f"atlas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except RunInterrupted as exc:  # the resume hint is already printed
        return exc.exit_code
    except KeyboardInterrupt:
        print("atlas: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if hasattr(exc, "format_message"):  # usage errors of typer's bundled click
            print(f"atlas: error: {_usage_message(exc)}", file=sys.stderr)
            return 2
        if _DEBUG["on"]:
            raise
        print(f"atlas: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
