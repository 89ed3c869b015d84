"""Bad input and failing environments: one line on stderr, non-zero exit, nothing lost."""
from __future__ import annotations

import errno
import json
import os

import torch

import atlasfl.engines.inprocess as inprocess
import atlasfl.results.io as rio
from atlasfl.cli.app import main
from tests.cli.test_cli import SMALL, _one_line_error


def _run(tmp_path, *extra, model="tiny-bert", method="local_only"):
    return main(["run", model, "1", method, *SMALL, "--output-dir", str(tmp_path / "results"),
                 "--checkpoint-dir", str(tmp_path / "ck"), *extra])


def test_data_folder_missing_a_file_or_a_column(tmp_path, capsys):
    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    code = main(["run", "tiny-bert", "1", "local_only", "--tasks", "sst2", "--data-dir", str(tmp_path / "glue"),
                 "--output-dir", str(tmp_path)])
    _one_line_error(capsys, code, "validation")
    (folder / "validation.tsv").write_text("text\tlabel\nfine\t1\n")
    code = main(["run", "tiny-bert", "1", "local_only", "--tasks", "sst2", "--data-dir", str(tmp_path / "glue"),
                 "--output-dir", str(tmp_path)])
    _one_line_error(capsys, code, "sentence")


def test_results_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["run", "tiny-bert", "1", "local_only", *SMALL, "--output-dir", str(blocker / "results")])
    _one_line_error(capsys, code, "cannot write", "--output-dir")


def test_disk_full_while_writing_keeps_the_previous_result(tmp_path, capsys, monkeypatch):
    assert _run(tmp_path) == 0
    path = next((tmp_path / "results").glob("*.json"))
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FillsUp:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 3])  # part of the bytes land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rio.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    capsys.readouterr()
    _one_line_error(capsys, _run(tmp_path, "--overwrite"), "No space left", "unchanged")
    assert path.read_bytes() == before
    assert json.loads(before)["status"] == "complete"
    assert [p.name for p in (tmp_path / "results").iterdir()] == [path.name]  # no temp file left behind


def test_cuda_out_of_memory_names_client_model_batch_and_remedies(tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(inprocess, "train_client", oom)
    err = _one_line_error(capsys, _run(tmp_path), "client 0", "tiny-bert", "batch size 8", "--batch-size",
                          "--fingerprint-samples", "--resume")
    assert "out of memory" in err
    assert list((tmp_path / "ck").rglob("states.safetensors"))  # the plan's checkpoint is kept


def test_debug_shows_the_traceback(tmp_path, capsys):
    try:
        main(["--debug", "run", "no-such-model", "1", "atlas", "--output-dir", str(tmp_path)])
    except Exception as exc:  # noqa: BLE001
        assert "unknown model" in str(exc)
    else:
        raise AssertionError("--debug should let the error propagate")


def test_a_rule_across_settings_is_one_short_line(capsys):
    """`atlas --aggregation fedavg` breaks a rule between two settings: the line names both, not a dump of all."""
    code = main(["run", "tiny-bert", "0", "atlas", "--aggregation", "fedavg"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("atlas: error: invalid settings: atlas's Laplacian step always refactors by SVD")
    assert "{" not in err
