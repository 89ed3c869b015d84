"""`atlas tune MODEL METHOD`: an Optuna study of the method's settings on one seed's clients' local validation."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from atlasfl.cli.options import CONFIG_HELP, merge_config_file, parse_seed, with_overrides
from atlasfl.config import METHODS, build_config, overridable_settings
from atlasfl.errors import AtlasError

DEV_SEED = 7  # the research benchmark's development seed: not one of the reported seeds (42, 123, 456)
OWN_KEYS = ("model", "method", "seed", "trials", "search_space")
NOT_HERE = ("engine", "tune", "tune_seed")  # trials run in-process; a study is what --tune runs


@with_overrides(exclude=NOT_HERE)
def tune(
    model: Optional[str] = typer.Argument(None, help="As `atlas run`'s MODEL.", show_default=False),
    method: Optional[str] = typer.Argument(None, help=" | ".join(METHODS), show_default=False),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials the study holds when done (finished or "
                                         "pruned); re-running continues the study up to this many.",
                                         show_default=False),
    seed: Optional[str] = typer.Option(None, "--seed", help=f"The seed whose clients' local validation the trials "
                                       f"are scored on (default {DEV_SEED}); it also seeds the sampler.",
                                       show_default=False),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Start no trial after this many seconds.",
                                            show_default=False),
    storage: Optional[str] = typer.Option(None, "--storage", help="SQLAlchemy URL of the study's database, e.g. "
                                          "postgresql://user@host/db (default: sqlite under "
                                          "OUTPUT_DIR/tuning/STUDY.db).", show_default=False),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the run name + _tune<trials>).",
                                        show_default=False),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP.format(keys="model, method, seed, trials")
                                         + " A [search_space] table narrows, widens or adds ranges: "
                                           "lr = [1e-4, 1e-2], or {low = ..., high = ..., log = true}."),
    overrides: dict | None = None,
):
    """Tune METHOD's settings for MODEL: each trial one federation, scored on local validation only."""
    from atlasfl.tuning import study_plan
    from atlasfl.tuning import tune as run_tuning
    from atlasfl.tuning.output import trials_table
    from atlasfl.tuning.study import masked

    given = dict(model=model, method=method, seed=seed, trials=trials)
    keys = [*OWN_KEYS, *(n for n in overridable_settings() if n not in NOT_HERE)]
    settings = merge_config_file(config, keys, given | overrides)
    for name in ("model", "method", "trials"):
        if settings.get(name) is None:
            where = f"`--{name}`" if name == "trials" else name.upper()
            raise AtlasError(f"missing {where}: give it on the command line or `{name} = ...` in a --config file")
    edits = settings.pop("search_space", None)
    if edits is not None and not isinstance(edits, dict):
        raise AtlasError("search_space in a config file is a table: [search_space] then lines like lr = [1e-4, 1e-2]")
    base = build_config(str(settings.pop("model")), parse_seed(str(settings.pop("seed", DEV_SEED))),
                        str(settings.pop("method")), **{k: v for k, v in settings.items() if k != "trials"})
    plan = study_plan(base, int(settings["trials"]), edits=edits, name=study, storage=storage)
    console = Console(soft_wrap=True)
    say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    say(f"study {plan.name} ({masked(plan.storage)}): searching {', '.join(plan.space)}")
    result, _ = run_tuning(plan, timeout=timeout, say=say)
    console.print(trials_table(plan, result))
