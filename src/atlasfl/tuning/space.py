"""What a study searches: the method's declared ranges (`Method.search_space`), changed or extended by a config
file's `[search_space]` table, less the settings the user fixed by flag or config key."""
from __future__ import annotations

from collections.abc import Iterable

from atlasfl.config import RunConfig, setting_type
from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS
from atlasfl.methods.base import Range

NUMERIC = (int, float)


def search_space(method: str, *, fixed: Iterable[str] = (), edits: dict | None = None) -> dict[str, Range]:
    """The ranges a study of `method` samples: `edits` (a `[search_space]` table: setting -> [low, high] or
    {low, high, log}) replace or add ranges; a setting in `fixed` is not searched (its given value holds)."""
    space = dict(METHODS[method].search_space)
    for name, value in (edits or {}).items():
        name = name.replace("-", "_")
        space[name] = edited_range(name, value, space.get(name))
    return {name: r for name, r in space.items() if name not in set(fixed)}


def edited_range(name: str, value, declared: Range | None) -> Range:
    """A `[search_space]` entry as a Range; a bare [low, high] keeps the declared scale (linear for a new one)."""
    if name not in RunConfig.model_fields or setting_type(name) not in NUMERIC:
        raise AtlasError(f"[search_space] {name!r} is not a numeric setting; search a number setting such as lr, "
                         "local_epochs or a method's own (see `atlas run --help`)")
    log = declared.log if declared is not None else False
    if isinstance(value, dict) and set(value) <= {"low", "high", "log"} and {"low", "high"} <= set(value):
        low, high, log = value["low"], value["high"], bool(value.get("log", log))
    elif isinstance(value, list) and len(value) == 2:
        low, high = value
    else:
        raise AtlasError(f"[search_space] {name} = {value!r}: write [low, high] or {{low = ..., high = ..., "
                         "log = true}}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise AtlasError(f"[search_space] {name}: low and high must be numbers, got {low!r} and {high!r}")
    if setting_type(name) is int and not all(float(v).is_integer() for v in (low, high)):
        raise AtlasError(f"[search_space] {name} is a whole number: give integer bounds, got [{low}, {high}]")
    try:
        return Range(low, high, log=log, why="set in the config file")
    except ValueError as exc:
        raise AtlasError(f"[search_space] {name}: {exc}") from None


def suggest(trial, space: dict[str, Range]) -> dict:
    """One value per setting from an Optuna trial: integers for an integer setting, floats otherwise."""
    out = {}
    for name, r in space.items():
        if setting_type(name) is int:
            out[name] = trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
        else:
            out[name] = trial.suggest_float(name, float(r.low), float(r.high), log=r.log)
    return out


def space_record(space: dict[str, Range]) -> dict:
    """The space as JSON (a study's user attribute and a result's tuning block)."""
    return {name: dict(low=r.low, high=r.high, log=r.log) for name, r in space.items()}
