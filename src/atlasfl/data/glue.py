"""GLUE tasks, through `datasets`: from the Hugging Face hub (`nyu-mll/glue`) or from a local folder in GLUE's
columns. The validation split is the test set."""

import csv
from pathlib import Path

from atlasfl.data.example import Example, Split
from atlasfl.errors import AtlasError

GLUE_COLUMNS = {  # text column, pair column, in the Hugging Face `nyu-mll/glue` layout
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence", None),
    "qnli": ("question", "sentence"),
}
_GLUE_HINT = (
    "pass --data-dir DIR with DIR/<task>/train.{parquet,csv,tsv} and validation.* in GLUE's columns, "
    "or use --tasks offline"
)


def load(name: str, labels: tuple[str, ...], data_dir: Path | None) -> Split:
    """`data_dir`/<name>/ when a folder is given, else the hub; `labels` (id order) lets files spell labels out,
    as GLUE's own QNLI files do."""
    if data_dir is not None:
        folder = data_dir / name
        if not folder.is_dir():
            raise AtlasError(f"no folder {folder} for GLUE task {name}; {_GLUE_HINT}")
        return _read_split(name, labels, folder, "train"), _read_split(name, labels, folder, "validation")
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", name)
    except ConnectionError as e:  # no hub on this machine (also raised in HF offline mode)
        raise AtlasError(f"the GLUE data for {name} could not be downloaded ({e}); {_GLUE_HINT}") from e
    where = f"nyu-mll/glue {name}"
    return _glue_examples(name, labels, ds["train"], where), _glue_examples(name, labels, ds["validation"], where)


def _read_split(name: str, labels: tuple[str, ...], folder: Path, split: str) -> list[Example]:
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
            return _glue_examples(name, labels, ds, str(path))
    raise AtlasError(f"missing {folder / split}.parquet (or .csv, .tsv) for GLUE task {name}; {_GLUE_HINT}")


def _glue_examples(name: str, labels: tuple[str, ...], ds, where: str) -> list[Example]:
    text_col, pair_col = GLUE_COLUMNS[name]
    for col in (text_col, pair_col, "label"):
        if col is not None and col not in ds.column_names:
            raise AtlasError(
                f"{where} has no column {col!r} (found {', '.join(ds.column_names)}); "
                f"GLUE {name} needs columns {', '.join(c for c in (text_col, pair_col, 'label') if c)}"
            )
    texts = list(ds[text_col])
    pairs = list(ds[pair_col]) if pair_col else [None] * len(texts)
    ids = [_glue_label(v, labels, where) for v in ds["label"]]
    return [Example(str(t), None if p is None else str(p), y) for t, p, y in zip(texts, pairs, ids)]


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
