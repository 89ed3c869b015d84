"""Experiments as files. A TOML file holds the same settings as the flags, under their field names (`batch_size`;
`batch-size` is accepted too): `atlas run --config FILE` adds model, seed and method, `atlas sweep --config FILE`
models, methods and seeds. Values go through the same validation as the flags (`build_config`). TOML has no
null: a setting that is unset where its default is not writes the string "none"."""
from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import typing
from collections.abc import Iterable
from pathlib import Path

from atlasfl.config import NULL, POSITIONAL, RunConfig, overridable_settings, setting_type
from atlasfl.errors import AtlasError

NONE = "none"


def nullable(name: str) -> bool:
    annotation = RunConfig.model_fields[name].annotation
    return type(None) in typing.get_args(annotation)


def read_config_file(path: str | Path, keys: Iterable[str]) -> dict:
    """The settings of a TOML config file as build_config keywords (plus the command's own `keys` that are
    not settings, as written). An unreadable file, bad TOML or a key outside `keys` is a one-line AtlasError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AtlasError(f"cannot read config file {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AtlasError(f"config file {path} is not valid TOML: {exc}") from None
    allowed = list(keys)
    out: dict = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            own = [k for k in allowed if k not in RunConfig.model_fields or k in POSITIONAL]
            raise AtlasError(f"unknown key {key!r} in config file {path}; {hint}the keys are {', '.join(own)} and "
                             "the command's options under their names (batch_size or batch-size)")
        if name in out:
            raise AtlasError(f"config file {path} sets {name!r} twice (as {name.replace('_', '-')!r} too)")
        out[name] = _file_value(name, value) if name in RunConfig.model_fields and name not in POSITIONAL else value
    return out


def _file_value(name: str, value):
    """A file value as the flag would give it: "none" unsets a nullable setting; a list setting takes a TOML
    array or a space- or comma-separated string. Everything else is validated by RunConfig itself."""
    if isinstance(value, str) and value.lower() == NONE and nullable(name):
        return NULL
    if typing.get_origin(setting_type(name)) is tuple:
        if isinstance(value, str):
            return tuple(v for v in re.split(r"[\s,]+", value) if v)
        if isinstance(value, list):
            return tuple(value)
    return value


def config_file_text(config: dict, source: str = "") -> str:
    """A result's `config` block as a TOML file that `atlas run --config FILE` runs again: every setting
    written out, so the run does not depend on preset defaults that may change."""
    lines = [f"# ATLAS run config{f' of {source}' if source else ''}; run it with `atlas run --config FILE`",
             "# (flags on the command line override these values; see `atlas run --help`).",
             *(f"{k} = {_toml_value(config[k])}" for k in POSITIONAL)]
    for name, field in overridable_settings().items():
        if name not in config:  # a result written before this setting existed: its default applies
            continue
        value = config[name]
        if value is None and field.default is None:
            lines.append(f"# {name} is not set: {field.description}")
        else:
            lines.append(f"{name} = {_toml_value(NONE if value is None else value)}")
    unknown = sorted(set(config) - set(RunConfig.model_fields))
    if unknown:
        raise AtlasError(f"the config block has keys this version of ATLAS does not know: {', '.join(unknown)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):  # JSON's escapes are TOML basic-string escapes; TOML also escapes DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise AtlasError(f"cannot write {value!r} to a TOML config file")
