"""Hyperparameter optimisation on Optuna, fair to every method: each method searches its own declared ranges
(`Method.search_space`) with the same number of trials on one seed's clients' local validation, never a test row.
`atlas tune` runs a study; `atlas run --tune N` and `atlas sweep --tune N` run one before the runs they report."""
from __future__ import annotations

from collections.abc import Callable

from atlasfl.config import RunConfig, build_config
from atlasfl.methods import METHODS
from atlasfl.tuning.space import search_space
from atlasfl.tuning.study import StudyPlan, best_config, plan_study, run_study, with_settings


def study_plan(base: RunConfig, trials: int, *, edits: dict | None = None, name: str | None = None,
               storage: str | None = None) -> StudyPlan:
    """The study of `base`'s method on `base`'s seed: the method's space (changed by `edits`, a [search_space]
    table) less the settings `base` sets to other than their default (the preset's or the field's), which are
    kept."""
    default = build_config(base.model, base.seed, base.method, mode=base.mode)
    names = {*METHODS[base.method].search_space, *(n.replace("-", "_") for n in edits or {})}
    fixed = {n for n in names if n in RunConfig.model_fields and getattr(base, n) != getattr(default, n)}
    return plan_study(base, search_space(base.method, fixed=fixed, edits=edits), trials, name=name, storage=storage)


def tune(plan: StudyPlan, *, timeout: float | None = None, say: Callable[[str], None] = print):
    """Run the study, write its best.toml and plots; the study and the best settings' run config."""
    from atlasfl.tuning.output import write_best_toml, write_plots

    study = run_study(plan, timeout=timeout, say=say)
    best = best_config(plan, study)
    say(f"best settings: {write_best_toml(plan, study, best)}")
    written, skipped = write_plots(plan, study)
    for line in [*map(str, written), *skipped]:
        say(f"plot: {line}")
    return study, best


def tuned_run(cfg: RunConfig, say: Callable[[str], None] = print) -> tuple[RunConfig, dict]:
    """`--tune N`: the study of `cfg` on --tune-seed's clients (default: its own), trials in this process; `cfg`
    with the best trial's settings, and the result's `tuning` block."""
    from atlasfl.tuning.output import tuning_record

    seed = cfg.seed if cfg.tune_seed is None else cfg.tune_seed
    plan = study_plan(with_settings(cfg, seed=seed, tune=None, tune_seed=None, engine="inprocess"), cfg.tune)
    study, _ = tune(plan, say=say)
    return with_settings(cfg, **study.best_trial.params), tuning_record(plan, study)
