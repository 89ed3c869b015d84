"""The ATLAS `ServerApp`, as pyproject.toml's [tool.flwr.app.components] names it (`app`); `flwr run .`
runs it on the SuperLink and `client_app.app` on every SuperNode.

Its run config is flat and typed, one key per `RunConfig` field (`max_samples` → `max-samples`), as
[tool.flwr.app.config] declares it. A setting whose default is the model's preset or "none" is unset
by its type's empty value (0, 0.0 or ""), which no such setting accepts as a real value; lists are
space-separated strings.
"""
from __future__ import annotations

import logging
import typing
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atlasfl.config import POSITIONAL, RunConfig, build_config, from_preset, overridable_settings, setting_type
from atlasfl.engines.flower.strategy import AtlasStrategy
from atlasfl.errors import AtlasError
from atlasfl.federation import driver
from atlasfl.results.io import atomic_write_json
from atlasfl.results.schema import validate_result

log = logging.getLogger("atlasfl")
FLOWER_ONLY = ("engine",)  # always `flower` inside the app
RESUME_KEY = "resume"  # not a setting (as --resume is not): continue from the run's last checkpoint


def run_config_key(name: str) -> str:
    return name.replace("_", "-")


def _unset_by_empty(name: str) -> bool:
    return from_preset(name) or RunConfig.model_fields[name].default is None


def run_config_defaults() -> dict[str, str | int | float | bool]:
    """The [tool.flwr.app.config] table `RunConfig` implies, with its defaults (empty: the preset's)."""
    table: dict[str, str | int | float | bool] = {"model": "tiny-bert", "seed": 0, "method": "atlas"}
    for name, field in overridable_settings().items():
        if name in FLOWER_ONLY:
            continue
        kind = setting_type(name)
        empty = kind() if kind in (int, float, bool) else ""
        value = empty if _unset_by_empty(name) else field.default
        table[run_config_key(name)] = " ".join(map(str, value)) if isinstance(value, tuple) else value
    table[RESUME_KEY] = False
    return table


def config_from_run_config(run_config: dict) -> RunConfig:
    """The RunConfig of a `flwr run`: [tool.flwr.app.config] plus `--run-config` overrides."""
    fields = RunConfig.model_fields
    values = {}
    for key, value in run_config.items():
        if key == RESUME_KEY:
            continue
        name = key.replace("-", "_")
        if name not in fields or name in FLOWER_ONLY:
            raise AtlasError(f"unknown run-config key {key!r}; the keys are those of [tool.flwr.app.config] "
                             "in pyproject.toml (the `atlas run` flags without their dashes)")
        if name in POSITIONAL:
            continue
        if typing.get_origin(setting_type(name)) is tuple:
            value = tuple(str(value).split())
        if _unset_by_empty(name) and value in (0, "", ()):
            value = None
        values[name] = value
    return build_config(str(run_config["model"]), int(run_config["seed"]), str(run_config["method"]),
                        **values, engine="flower")


def make_server_app(cfg: RunConfig | None = None, sink: Callable[[dict], None] | None = None,
                    resume: bool = False) -> ServerApp:
    """A ServerApp for `cfg` (else the run config of `flwr run`, whose `resume = true` continues from the
    last checkpoint); the result goes to `sink` (else it is validated and written to the config's result
    path, as `atlas run` writes it); an AtlasError that stops the run goes to `sink` too."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_run_config(dict(context.run_config))
        try:
            result = driver.run(run_cfg, AtlasStrategy(run_cfg, grid),
                                resume=resume or bool(context.run_config.get(RESUME_KEY)))
        except AtlasError as exc:  # one line in the log; a simulation's caller re-raises it
            log.error("%s", exc)
            if sink is None:
                raise
            sink(exc)
            return
        validate_result(result)
        if sink is not None:
            sink(result)
        else:
            atomic_write_json(run_cfg.result_path, result)
            log.info("wrote %s", run_cfg.result_path)

    return server_app


app = make_server_app()
