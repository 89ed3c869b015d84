"""The `atlas` command: a thin face over `atlasfl.experiment`. Errors in the user's input print one line
(and exit 2); `--debug` shows the traceback instead."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from atlasfl.config import METHODS, build_config
from atlasfl.errors import AtlasError
from atlasfl.options import with_overrides
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
@with_overrides()
def run(
    model: str = typer.Argument(..., help="distilbert | gpt2 | gpt2-xl | qwen2.5 | minilm | tiny-* | HF id | folder"),
    seed: str = typer.Argument(..., help="Random seed (non-negative integer)."),
    method: str = typer.Argument(..., help=" | ".join(METHODS)),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last complete checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete result JSON."),
    overrides: dict | None = None,
):
    """Run one experiment: MODEL SEED METHOD."""
    cfg = build_config(model, _seed(seed), method, **overrides)
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
