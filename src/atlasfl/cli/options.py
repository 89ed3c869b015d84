"""The settings `atlas run` and `atlas sweep` share, derived from `RunConfig`'s fields: each field is
one flag with the field's description as its help, so a new setting needs one declaration."""
from __future__ import annotations

import functools
import inspect
import re
import typing
from typing import Annotated, List, Literal, Optional

import typer
from typer.core import TyperCommand

from atlasfl.config import FROM_PRESET, RunConfig, from_preset, overridable_settings, setting_type
from atlasfl.config_file import read_config_file
from atlasfl.errors import AtlasError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise AtlasError(f"seed must be a non-negative integer, got {value!r}") from None
    if seed < 0:
        raise AtlasError(f"seed must be a non-negative integer, got {seed}")
    return seed


def split_values(values: List[str] | None) -> list[str]:
    """Values given space-separated, repeated or comma-separated, in order."""
    return [v for item in values or () for v in re.split(r"[,\s]+", item) if v]


CONFIG_HELP = ("TOML file of settings: {keys} and any option of this command by its name (batch_size or batch-size); "
               "flags given on the command line win. `atlas config RESULT.json` writes one from a result.")


def merge_config_file(path: str | None, keys, given: dict) -> dict:
    """The settings of config file `path` (if any) overridden by every value given on the command line
    (None: not given)."""
    settings = read_config_file(path, keys) if path else {}
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def option_for(name: str) -> tuple[object, object]:
    """The typer annotation and default of the setting `name`. Unset flags are None: the preset's or
    the field's default applies (`build_config`)."""
    field = RunConfig.model_fields[name]
    bare, help_text = setting_type(name), field.description
    if bare is bool:
        on, off = flag(name), "--no-" + flag(name)[2:]
        shown = "on" if field.default else "off"
        return Annotated[Optional[bool], typer.Option(f"{on}/{off}", help=help_text, show_default=shown)], None
    if typing.get_origin(bare) is Literal:
        help_text += " One of: " + " | ".join(typing.get_args(bare)) + "."
        cli_type = Optional[str]
    elif typing.get_origin(bare) is tuple:
        help_text += " Space- or comma-separated values."
        cli_type = Optional[List[str]]
    else:
        cli_type = Optional[bare]
    if from_preset(name):
        shown = FROM_PRESET
    elif field.default is None:
        shown = False
    else:
        shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else str(field.default)
    return Annotated[cli_type, typer.Option(flag(name), help=help_text, show_default=shown)], None


def config_overrides(**values) -> dict:
    """The commands' option values as build_config keywords: lists become tuples, unset flags None."""
    out = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(split_values(value)) or None
        out[key] = value
    return out


def with_overrides(*, exclude: tuple[str, ...] = ()):
    """Give a typer command every overridable setting as an option; the command receives them as one
    `overrides` dict of build_config keywords instead of one parameter each."""
    names = [n for n in overridable_settings() if n not in exclude]

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        own = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "overrides"]
        shared = []
        for n in names:
            annotation, default = option_for(n)
            shared.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return command(*args, overrides=config_overrides(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


def spread_list_options(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`--methods a b c` → `--methods a --methods b --methods c`: a list option takes every value up to
    the next option, so grids read as they are written (repeating the flag works too)."""
    out: list[str] = []
    current, first = None, True
    for arg in args:
        if arg.startswith("-"):
            current, first = (arg if arg in names else None), True
        elif current is not None:
            if not first:
                out.append(current)
            first = False
        out.append(arg)
    return out


class ListOptionsCommand(TyperCommand):
    """A command whose list options take space-separated values (`--tasks sst2 mrpc`). Its positional
    arguments come before the options, as in `atlas run MODEL SEED METHOD --tasks a b`."""

    def parse_args(self, ctx, args):
        names = tuple(o for p in self.params if getattr(p, "multiple", False) for o in p.opts)
        return super().parse_args(ctx, spread_list_options(args, names))
