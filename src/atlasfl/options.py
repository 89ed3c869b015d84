"""The settings `atlas run` and `atlas sweep` share: declared once, added to both commands by
`with_overrides`, and turned into build_config keywords once."""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, List, Optional

import typer

Rounds = Annotated[Optional[int], typer.Option(help="Federated rounds (preset: 10).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Training batch size.")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate (AdamW).")]
LocalEpochs = Annotated[Optional[int], typer.Option(help="Local epochs per round.")]
MaxSamples = Annotated[Optional[int], typer.Option(help="Max training examples per client.")]
MaxTestSamples = Annotated[Optional[int], typer.Option(help="Cut each task's test set (default: all).")]
FingerprintSamples = Annotated[Optional[int], typer.Option(help="Examples per client for fingerprints.")]
Tasks = Annotated[Optional[List[str]], typer.Option(help="Tasks or task sets (glue, offline, generated).")]
ClientsPerTask = Annotated[Optional[int], typer.Option(help="Clients per task (preset: 3).")]
Mode = Annotated[str, typer.Option(help="quick (smoke sizes, 2 rounds) | full.")]
OutputDir = Annotated[Optional[str], typer.Option(help="Folder for result JSONs (default: results).")]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.")]
DirichletAlpha = Annotated[Optional[float], typer.Option(help="Dirichlet label skew (default: IID).")]
DataDir = Annotated[Optional[str], typer.Option(help="Local GLUE folder: DIR/<task>/train.* and validation.*")]
Init = Annotated[Optional[str], typer.Option(help="pretrained | random (full-size random weights, for benchmarks).")]
Eta = Annotated[Optional[float], typer.Option(help="Laplacian step size of atlas, in [0, 1] (default 0.1).")]
LambdaSweep = Annotated[bool, typer.Option("--lambda-sweep", help="atlas: run the eta grid, pick eta on local validation.")]
Aggregation = Annotated[Optional[str], typer.Option(help="svd | fedavg (default: svd for heterogeneous ranks).")]
Devices = Annotated[Optional[List[str]], typer.Option(
    help="Device profiles to draw from (cpu_2gb tablet_4gb laptop_8gb gpu_16gb).")]
Clusters = Annotated[Optional[str], typer.Option(help="fingerprint (default) | oracle (true task grouping).")]
Fingerprint = Annotated[Optional[str], typer.Option(help="representation (default) | gradient.")]
Engine = Annotated[Optional[str], typer.Option(
    help="inprocess (default) | flower (the Flower app on Flower's Simulation Runtime).")]
CheckpointDir = Annotated[Optional[str], typer.Option(help="Folder for per-round checkpoints (default: checkpoints).")]


def split_values(values: List[str] | None) -> list[str]:
    """Values given space-separated, repeated or comma-separated, in order."""
    return [v for item in values or () for v in item.split(",") if v]


def config_overrides(**values) -> dict:
    """The commands' option values as build_config keywords: lists become tuples, unset flags None."""
    out = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(split_values(value)) or None
        out[key] = None if value is False else value
    return out


# Every shared override: its option declaration and its default (None: the preset's value).
OVERRIDES = dict(
    rounds=Rounds, batch_size=BatchSize, lr=Lr, local_epochs=LocalEpochs, max_samples=MaxSamples,
    max_test_samples=MaxTestSamples, fingerprint_samples=FingerprintSamples, tasks=Tasks,
    clients_per_task=ClientsPerTask, mode=Mode, output_dir=OutputDir, device=Device, dirichlet_alpha=DirichletAlpha,
    data_dir=DataDir, init=Init, eta=Eta, lambda_sweep=LambdaSweep, aggregation=Aggregation, devices=Devices,
    clusters=Clusters, fingerprint=Fingerprint, engine=Engine, checkpoint_dir=CheckpointDir,
)
DEFAULTS = dict(mode="full", lambda_sweep=False)


def with_overrides(*, exclude: tuple[str, ...] = ()):
    """Give a typer command every shared override as an option; the command receives them as one
    `overrides` dict of build_config keywords instead of one parameter each."""
    names = [n for n in OVERRIDES if n not in exclude]

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        own = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "overrides"]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=DEFAULTS.get(n), annotation=OVERRIDES[n])
                  for n in names]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return command(*args, overrides=config_overrides(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate
