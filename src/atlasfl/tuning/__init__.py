"""Hyperparameter optimisation on Optuna, fair to every method: each method searches its own declared ranges
(`Method.search_space`) with the same number of trials on one seed's clients' local validation, never a test row.
`atlas tune` runs a study; `atlas run --tune N` and `atlas sweep --tune N` run one before the runs they report."""
from __future__ import annotations

from collections.abc import Callable

from atlasfl.config import QUICK, RunConfig, build_config
from atlasfl.tuning.space import search_space
from atlasfl.tuning.study import StudyPlan, best_config, plan_study, run_study


def study_plan(model: str, seed: int, method: str, trials: int, *, edits: dict | None = None,
               name: str | None = None, storage: str | None = None, **overrides) -> StudyPlan:
    """The study of `method` on `seed`'s clients with the given settings; a setting given (flag or config key, or
    set by --mode quick) is fixed, the rest of the method's space is searched."""
    fixed = {k for k, v in overrides.items() if v is not None} | (set(QUICK) if overrides.get("mode") == "quick"
                                                                  else set())
    base = build_config(model, seed, method, **overrides)
    return plan_study(base, search_space(method, fixed=fixed, edits=edits), trials, name=name, storage=storage)


def tune(plan: StudyPlan, *, timeout: float | None = None, say: Callable[[str], None] = print):
    """Run the study, write its best.toml and plots; the study and the best settings' run config."""
    from atlasfl.tuning.output import write_best_toml, write_plots

    study = run_study(plan, timeout=timeout, say=say)
    best: RunConfig = best_config(plan, study)
    say(f"best settings: {write_best_toml(plan, study, best)}")
    written, skipped = write_plots(plan, study)
    for line in [*map(str, written), *skipped]:
        say(f"plot: {line}")
    return study, best
