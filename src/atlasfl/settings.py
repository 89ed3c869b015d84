"""How a run setting is declared, once: its type, default, constraints and help on one field. `config.RunConfig`
collects the general settings and every method's own (`methods.Method.settings`); the CLI flags and the Flower
run-config keys are derived from those fields."""
from __future__ import annotations

from pydantic import Field


def setting(description: str, default=..., *, preset: bool = False, **constraints):
    """A run setting with its help text; `preset`: the default comes from the model's preset (`build_config`)."""
    extra = {"preset": True} if preset else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)
