"""The `atlas` command: one place that registers every command (each in its own module) and turns
errors into one line. Errors in the user's input print one line and exit 2; `--debug` shows the
traceback instead."""
from __future__ import annotations

import sys

import typer

from atlasfl.cli.bench import bench
from atlasfl.cli.configfile import config
from atlasfl.cli.options import ListOptionsCommand
from atlasfl.cli.report import report
from atlasfl.cli.run import demo, presets, run
from atlasfl.cli.sweep import sweep
from atlasfl.cli.tune import tune
from atlasfl.errors import AtlasError, RunInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ATLAS: multi-task federated LoRA fine-tuning experiments.")
app.command("run", cls=ListOptionsCommand)(run)
app.command("demo")(demo)
app.command("presets")(presets)
app.command("sweep", cls=ListOptionsCommand)(sweep)
app.command("tune", cls=ListOptionsCommand)(tune)
app.command("report", cls=ListOptionsCommand)(report)
app.command("config")(config)
app.command("bench")(bench)
_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _DEBUG["on"] = debug


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
