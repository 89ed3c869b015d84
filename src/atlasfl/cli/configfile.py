"""`atlas config`: a result's `config` block as a TOML file that `atlas run --config FILE` runs again."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from atlasfl.config import POSITIONAL
from atlasfl.config_file import config_file_text
from atlasfl.errors import AtlasError


def config(
    result: str = typer.Argument(..., help="A result JSON written by `atlas run` or `atlas sweep`."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the file here (default: print it)."),
):
    """Write the settings of a finished run as a config file: `atlas run --config FILE` repeats the run."""
    path = Path(result)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AtlasError(f"cannot read {path} ({exc.strerror})") from None
    except ValueError:
        raise AtlasError(f"{path} is not a JSON file") from None
    block = data.get("config") if isinstance(data, dict) else None
    if not isinstance(block, dict) or any(k not in block for k in POSITIONAL):
        raise AtlasError(f"{path} has no ATLAS `config` block (is it a result JSON of `atlas run`?)")
    text = config_file_text(block, source=data.get("run_name", path.name))
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise AtlasError(f"cannot write {output} ({exc.strerror})") from None
    typer.echo(f"wrote {output}; run it again with: atlas run --config {output}")
