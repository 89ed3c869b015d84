"""One Optuna study of one method on one seed's clients. A trial is one in-process federation with the trial's
settings; its score is the mean local-validation task score of the clients after the last round, reported every
round for the median pruner. No test row reaches the tuner: the driver's `on_round` hands it validation only.

The study lives in an RDB storage (a SQLite file under the output folder unless `--storage` names another), so
re-running the command continues it and several processes or machines can run trials of one study at once
(Optuna's own distributed mode). Trials are seeded from the study's seed and the number of trials before them,
so the same command on the same data gives the same trials, also when it is continued. A trial whose process
died stops sending heartbeats; Optuna then fails it and queues it again, and the retry resumes the federation
from the dead trial's last checkpoint."""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from atlasfl.config import RunConfig, describe_validation_error, setting_type
from atlasfl.errors import AtlasError
from atlasfl.methods.base import Range
from atlasfl.results.checkpoint import clear_checkpoints
from atlasfl.tuning.space import space_record, suggest

log = logging.getLogger("atlasfl")
HEARTBEAT_S, GRACE_S = 10, 30  # a trial silent for GRACE_S seconds is taken for dead and retried
MAX_RETRIES = 2
FINISHED = ("COMPLETE", "PRUNED")
# Settings that say where files go or what runs them: two runs differing only in these are the same study.
PLACES = ("output_dir", "log_dir", "checkpoint_dir", "tensorboard", "save_adapters", "device", "tune", "tune_seed")


@dataclass(frozen=True)
class StudyPlan:
    """A study to run: the settings every trial shares (`base`; its seed is the data's and the sampler's), the
    ranges searched, the trials the study holds when done, its name and its storage URL."""

    base: RunConfig
    space: dict[str, Range]
    trials: int
    name: str
    storage: str

    @property
    def folder(self) -> Path:
        """Where the study's outputs go: best.toml, the plots."""
        return Path(self.base.output_dir) / "tuning" / self.name

    @property
    def record(self) -> dict:
        """What makes two studies the same one (a study's user attributes): settings and ranges."""
        settings = {k: v for k, v in self.base.model_dump(mode="json").items() if k not in PLACES}
        return json.loads(json.dumps(dict(settings=settings, space=space_record(self.space))))


def with_settings(cfg: RunConfig, **values) -> RunConfig:
    try:
        return RunConfig(**{**cfg.model_dump(), **values})
    except ValidationError as exc:
        raise AtlasError(describe_validation_error(exc)) from exc


def plan_study(base: RunConfig, space: dict[str, Range], trials: int, *, name: str | None = None,
               storage: str | None = None) -> StudyPlan:
    """Check that the study can run, and name it and its storage (default: `<output_dir>/tuning/<name>.db`)."""
    if trials < 1:
        raise AtlasError(f"--trials must be at least 1, got {trials}")
    if base.engine != "inprocess":
        raise AtlasError("trials run in this process; drop --engine flower (run the tuned settings on Flower "
                         "afterwards with `atlas run --config best.toml --engine flower`)")
    if base.lambda_sweep:
        raise AtlasError("a study searches eta itself; drop --lambda-sweep")
    if not space:
        raise AtlasError("nothing to search: every setting of the method's search space is fixed by a flag or the "
                         "config file; drop one, or add a range under [search_space]")
    for setting, r in space.items():  # a range the setting's own constraints refuse fails now, not in trial 7
        for bound in (r.low, r.high):
            with_settings(base, **{setting: int(bound) if setting_type(setting) is int else bound})
    name = name or f"{base.run_name}_tune{trials}"
    if storage is None:
        path = Path(base.output_dir) / "tuning" / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{path.resolve()}"
    return StudyPlan(base, space, trials, name, storage)


def open_study(plan: StudyPlan):
    """The study in its storage, created (its defaults queued as trial 0) or loaded and checked to be the same."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs = {"connect_args": {"timeout": 60}} if plan.storage.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(
            plan.storage, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRIES, inherit_intermediate_values=True))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's many errors for a bad URL, a missing driver, a server
        raise AtlasError(f"cannot open the study storage {masked(plan.storage)} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); give --storage sqlite:///FILE.db or a reachable "
                         "database URL") from None
    study = optuna.create_study(study_name=plan.name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    known = study.user_attrs.get("atlas")
    if known is None:
        study.set_user_attr("atlas", plan.record)
        defaults = {n: getattr(plan.base, n) for n, r in plan.space.items() if r.low <= getattr(plan.base, n) <= r.high}
        if defaults:
            study.enqueue_trial(defaults)  # the untuned settings are always one of the trials
    elif known != plan.record:
        differ = sorted(k for part in ("settings", "space") for k in set(known[part]) | set(plan.record[part])
                        if known[part].get(k) != plan.record[part].get(k))
        raise AtlasError(f"study {plan.name!r} in {masked(plan.storage)} was made with other settings or ranges "
                         f"({', '.join(differ)}); name a new study with --study NAME")
    return study


def finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED]


def run_study(plan: StudyPlan, *, timeout: float | None = None, say: Callable[[str], None] = print):
    """Run trials until the study holds `plan.trials` finished (complete or pruned) ones, or `timeout` seconds
    have passed (checked before each trial); returns the study."""
    import optuna

    study = open_study(plan)
    start = time.monotonic()
    while len(finished(study)) < plan.trials:
        if timeout is not None and time.monotonic() - start > timeout:
            say(f"{plan.name}: --timeout {timeout:g}s reached after {len(finished(study))} finished trials")
            break
        seed = (plan.base.seed * 1_000_003 + len(study.trials)) % 2**32
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, plan.trials // 4))
        ran: list = []
        study.optimize(lambda trial: objective(plan, trial), n_trials=1,
                       callbacks=[lambda _, t, ran=ran: ran.append(t)])
        (last,) = ran
        say(f"{plan.name}: trial {last.number} {last.state.name.lower()}"
            + (f", validation {last.value:.4f}" if last.value is not None else "") + f": {last.params}")
    return study


def objective(plan: StudyPlan, trial) -> float:
    """One trial: a federation with the trial's settings; validation every round, for the pruner."""
    import optuna

    from atlasfl.engines.inprocess import run_experiment
    from atlasfl.experiment import setup_logging

    params = suggest(trial, plan.space)
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    cfg = trial_config(plan, params, trial.number if retried is None else retried)
    setup_logging(cfg)

    def report(round_idx: int, val: dict[int, dict]) -> None:
        trial.report(mean_score(val), round_idx)
        if trial.should_prune():
            raise optuna.TrialPruned(f"round {round_idx}: below the median of earlier trials")

    t0 = time.perf_counter()
    try:
        result = run_experiment(cfg, progress=False, resume=retried is not None, on_round=report)
    except optuna.TrialPruned:
        clear_checkpoints(cfg.checkpoint_path)
        raise
    finally:
        trial.set_user_attr("seconds", time.perf_counter() - t0)
    clear_checkpoints(cfg.checkpoint_path)
    scores = [m["val_score"] for m in result["final_metrics"]["per_client"].values()]
    return float(np.mean(scores))


def mean_score(val: dict[int, dict]) -> float:
    """The objective: the clients' mean local-validation score of their task's metric."""
    return float(np.mean([v["score"] for v in val.values()]))


def trial_config(plan: StudyPlan, params: dict, number: int) -> RunConfig:
    """A trial's run: the study's settings with the trial's values, its checkpoints and log in its own folders
    (trials of one study may run at once), no adapters or curves written."""
    base = plan.base
    return with_settings(base, **params, checkpoint_dir=str(Path(base.checkpoint_dir) / plan.name / f"trial{number}"),
                         log_dir=str(Path(base.log_dir) / plan.name / f"trial{number}"), save_adapters=None,
                         tensorboard=None)


def best_config(plan: StudyPlan, study) -> RunConfig:
    """The study's settings with its best trial's values: what `atlas run` then runs."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        raise AtlasError(f"study {plan.name!r} has no complete trial yet; run more trials (--trials, --timeout)")
    return with_settings(plan.base, **study.best_trial.params)


def masked(url: str) -> str:
    """A storage URL without its password, fit for a log or a result file."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as far as it is harmless
        return url.split("@")[-1]
