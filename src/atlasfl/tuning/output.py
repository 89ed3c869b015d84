"""What a study leaves: the best settings as a TOML file `atlas run --config` takes, a table of its trials,
Optuna's optimisation-history and parameter-importance plots as PNG, and the `tuning` block of a tuned run's
result JSON."""
from __future__ import annotations

import warnings
from pathlib import Path

from rich.table import Table

from atlasfl.config import RunConfig
from atlasfl.config_file import config_file_text
from atlasfl.tuning.study import StudyPlan, finished, masked


def trials_table(plan: StudyPlan, study) -> Table:
    table = Table(title=f"{plan.name}: {len(finished(study))} of {plan.trials} trials finished "
                        f"(objective: mean local-validation score after round {plan.base.rounds})")
    for col in ("trial", "state", "validation", "rounds", "seconds", *plan.space):
        table.add_column(col, justify="right" if col != "state" else "left")
    best = best_number(study)
    for t in study.get_trials(deepcopy=False):
        value = "" if t.value is None else f"{t.value:.4f}" + (" *" if t.number == best else "")
        seconds = t.user_attrs.get("seconds")
        table.add_row(str(t.number), t.state.name.lower(), value, str(len(t.intermediate_values)),
                      "" if seconds is None else f"{seconds:.1f}",
                      *(_shown(t.params[n]) if n in t.params else "" for n in plan.space))
    return table


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_number(study) -> int | None:
    return study.best_trial.number if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) \
        else None


def write_best_toml(plan: StudyPlan, study, best: RunConfig) -> Path:
    """best.toml: every setting of the best trial's run, so `atlas run --config best.toml` runs it (give
    MODEL SEED METHOD on the command line to run it on other seeds)."""
    path = plan.folder / "best.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    trial = study.best_trial
    source = (f"study {plan.name}: trial {trial.number} of {len(finished(study))}, mean local validation "
              f"{trial.value:.4f}")
    path.write_text(config_file_text(best.model_dump(mode="json"), source))
    return path


def write_plots(plan: StudyPlan, study) -> tuple[list[Path], list[str]]:
    """history.png and importance.png (Optuna's matplotlib visualisation); what could not be drawn, and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    plan.folder.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = {"history": vis.plot_optimization_history}
    if len(complete) >= 2 and len({t.value for t in complete}) > 1:
        plots["importance"] = vis.plot_param_importances
    else:
        skipped.append("importance.png: needs two complete trials with different scores")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib functions are marked experimental
        for name, draw in plots.items():
            ax = draw(study)
            path = plan.folder / f"{name}.png"
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(path)
    return written, skipped


def tuning_record(plan: StudyPlan, study) -> dict:
    """A tuned run's `tuning` block: the study, its budget and ranges, every trial, the best one's settings and its
    validation scores (per round and final)."""
    from atlasfl.tuning.space import space_record

    trials = study.get_trials(deepcopy=False)
    best = study.best_trial
    return dict(
        study=plan.name, storage=masked(plan.storage), seed=plan.base.seed,
        budget=dict(trials=plan.trials, rounds_per_trial=plan.base.rounds, finished=len(finished(study)),
                    pruned=sum(t.state.name == "PRUNED" for t in trials)),
        space=space_record(plan.space), untuned={n: getattr(plan.base, n) for n in plan.space},
        objective="mean local-validation task score of the clients after the last round (no test row is read)",
        best=dict(trial=best.number, params=best.params, val_score=best.value,
                  val_scores={str(k): v for k, v in sorted(best.intermediate_values.items())}),
        trials=[dict(number=t.number, state=t.state.name.lower(), params=t.params, val_score=t.value,
                     rounds=len(t.intermediate_values)) for t in trials])
