"""Experiments as files: `atlas run --config`, `atlas sweep --config` and `atlas config RESULT.json`."""
from __future__ import annotations

import json
import tomllib

import pytest
import typer

from atlasfl.cli.app import main
from atlasfl.config_file import config_file_text, read_config_file

SMALL = dict(tasks=["gen_sentiment", "gen_pair"], clients_per_task=2, rounds=2, max_samples=16, max_test_samples=8,
             batch_size=8, fingerprint_samples=8)


def _toml(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def captured(monkeypatch):
    """The configs `atlas run`/`atlas sweep` would run, without running them."""
    seen = []

    def fake_run(cfg, **_):
        seen.append(cfg)
        raise typer.Exit(0)

    def fake_sweep(configs, **_):
        seen.extend(configs)
        raise typer.Exit(0)

    monkeypatch.setattr("atlasfl.cli.run.run_and_save", fake_run)
    monkeypatch.setattr("atlasfl.cli.sweep.run_sweep", fake_sweep)
    return seen


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_run_config_file_sets_everything_and_flags_win(tmp_path, captured):
    path = _toml(tmp_path / "exp.toml", 'model = "tiny-bert"\nseed = 5\nmethod = "fedavg_cluster"\nrounds = 3\n'
                 'batch-size = 4\ntasks = ["gen_sentiment", "gen_pair"]\nmax_samples = "none"\nlambda_sweep = true\n')
    assert main(["run", "--config", path, "--rounds", "1"]) == 0
    cfg = captured[-1]
    assert (cfg.model, cfg.seed, cfg.method) == ("tiny-bert", 5, "fedavg_cluster")
    assert cfg.rounds == 1 and cfg.batch_size == 4  # the flag wins; the hyphenated key is accepted
    assert cfg.tasks == ("gen_sentiment", "gen_pair") and cfg.lambda_sweep
    assert cfg.max_samples is None  # "none" unsets a setting whose preset default is a number
    assert main(["run", "tiny-gpt2", "6", "local_only", "--config", path]) == 0  # positionals win too
    assert (captured[-1].model, captured[-1].seed, captured[-1].method) == ("tiny-gpt2", 6, "local_only")


def test_on_off_flags_win_over_the_file_both_ways(tmp_path, captured):
    # The file sets both switches against their defaults (grouping on, client batching off).
    path = _toml(tmp_path / "exp.toml", 'model = "tiny-bert"\nseed = 5\nmethod = "atlas"\ngroup_by_length = false\n'
                 'client_batching = true\n')
    assert main(["run", "--config", path, "--no-client-batching"]) == 0
    assert not captured[-1].group_by_length and not captured[-1].client_batching  # an unset flag keeps the file's
    grid = _toml(tmp_path / "grid.toml", 'models = ["tiny-bert"]\nmethods = ["atlas"]\nseeds = [5]\n'
                 'group_by_length = false\nclient_batching = true\n')
    assert main(["sweep", "--config", grid, "--group-by-length"]) == 0
    assert captured[-1].group_by_length and captured[-1].client_batching


def test_unknown_key_is_one_line_naming_it(tmp_path, capsys, captured):
    path = _toml(tmp_path / "exp.toml", 'model = "tiny-bert"\nseed = 1\nmethod = "atlas"\nnum_rounds = 3\n')
    assert main(["run", "--config", path]) == 2
    err = _error_line(capsys)
    assert "unknown key 'num_rounds'" in err and "exp.toml" in err and "did you mean 'rounds'?" in err
    assert not captured


@pytest.mark.parametrize("flag, key, value", [("--rounds", "rounds", "0"), ("--lr", "lr", "-1.0"),
                                              ("--mode", "mode", '"fast"'), ("--eta", "eta", "2.0")])
def test_bad_value_gives_the_flags_message(tmp_path, capsys, captured, flag, key, value):
    assert main(["run", "tiny-bert", "1", "atlas", flag, value.strip('"')]) == 2
    from_flag = _error_line(capsys)
    path = _toml(tmp_path / "exp.toml", f'model = "tiny-bert"\nseed = 1\nmethod = "atlas"\n{key} = {value}\n')
    assert main(["run", "--config", path]) == 2
    assert _error_line(capsys) == from_flag
    assert not captured


@pytest.mark.parametrize("text, needle", [
    ('seed = 1\nmethod = "atlas"\n', "Missing argument 'MODEL'"),
    ('model = "tiny-bert"\nseed = -3\nmethod = "atlas"\n', "seed must be a non-negative integer"),
    ('model = "tiny-bert"\nseed = 1\nmethod = "atlas"\nrounds = \n', "not valid TOML"),
    ('models = ["tiny-bert"]\nseed = 1\nmethod = "atlas"\n', "unknown key 'models'"),
])
def test_bad_run_files_are_one_line(tmp_path, capsys, captured, text, needle):
    assert main(["run", "--config", _toml(tmp_path / "exp.toml", text)]) == 2
    assert needle in _error_line(capsys)
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in _error_line(capsys)


def test_sweep_config_file(tmp_path, capsys, captured):
    path = _toml(tmp_path / "grid.toml", 'models = ["tiny-bert", "tiny-gpt2"]\nmethods = "local_only atlas"\n'
                 'seeds = [1, 2]\nrounds = 3\ntasks = "gen_sentiment gen_pair"\n')
    assert main(["sweep", "--config", path, "--seeds", "7"]) == 0
    assert [(c.model, c.seed, c.method) for c in captured] == [
        ("tiny-bert", 7, "local_only"), ("tiny-bert", 7, "atlas"), ("tiny-gpt2", 7, "local_only"),
        ("tiny-gpt2", 7, "atlas")]
    assert all(c.rounds == 3 and c.tasks == ("gen_sentiment", "gen_pair") for c in captured)
    captured.clear()
    bad = _toml(tmp_path / "bad.toml", 'models = ["tiny-bert"]\nmethods = ["atlas"]\nseeds = [1]\nengine = "flower"\n')
    assert main(["sweep", "--config", bad]) == 2
    assert "unknown key 'engine'" in _error_line(capsys)
    nogrid = _toml(tmp_path / "nogrid.toml", 'models = ["tiny-bert"]\nseeds = [1]\n')
    assert main(["sweep", "--config", nogrid]) == 2
    assert "Missing option '--methods'" in _error_line(capsys)
    assert not captured


def test_config_text_round_trips_every_kind_of_value(tmp_path):
    block = dict(model='we"ird\\name', seed=3, method="atlas", lr=1e-05, max_samples=None, dirichlet_alpha=None,
                 rank_candidates=[2, 4], tasks=["sst2"], lambda_sweep=True, data_dir=None, eta=0.25)
    text = config_file_text(block)
    parsed = tomllib.loads(text)
    assert parsed["model"] == block["model"] and parsed["lr"] == 1e-05 and parsed["max_samples"] == "none"
    assert "dirichlet_alpha" not in parsed  # unset and unset by default: written as a comment
    read = read_config_file(_toml(tmp_path / "x.toml", text), [*block])
    assert read["max_samples"] is not None and read["rank_candidates"] == (2, 4) and read["eta"] == 0.25


def _comparable(result: dict) -> dict:
    """A result without what legitimately differs between two runs of one config: clocks and memory."""
    out = {k: v for k, v in result.items() if k not in ("time_metrics", "memory")}
    out["round_metrics"] = [{k: v for k, v in r.items() if k != "time_s"} for r in result["round_metrics"]]
    return out


def test_result_config_reruns_to_the_same_result(tmp_path, monkeypatch, capsys):
    """A published result is enough to repeat its run: run → atlas config → atlas run --config → same result."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    args = ["run", "tiny-bert", "4", "atlas"]
    for key, value in SMALL.items():
        args += ["--" + key.replace("_", "-"), *(value if isinstance(value, list) else [str(value)])]
    assert main(args) == 0
    (result,) = (first / "results").glob("*.json")
    assert main(["config", str(result), "-o", str(tmp_path / "exp.toml")]) == 0
    assert main(["config", str(result)]) == 0
    capsys.readouterr()
    monkeypatch.chdir(second)  # the same relative output folders, elsewhere
    assert main(["run", "--config", str(tmp_path / "exp.toml")]) == 0
    again = second / "results" / result.name
    assert _comparable(json.loads(again.read_text())) == _comparable(json.loads(result.read_text()))


def test_config_of_a_non_result_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"rounds": 3}')
    assert main(["config", str(bad)]) == 2
    assert "no ATLAS `config` block" in _error_line(capsys)


def test_divergence_is_flagged_in_the_json_and_on_stderr(tmp_path, capsys):
    """--lr 1000 used to finish silently with losses in the thousands and near-chance scores."""
    args = ["run", "tiny-bert", "0", "local_only", "--lr", "1000", "--output-dir", str(tmp_path),
            "--log-dir", str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ck")]
    for key, value in dict(SMALL, rounds=1).items():
        args += ["--" + key.replace("_", "-"), *(value if isinstance(value, list) else [str(value)])]
    assert main(args) == 0
    captured = capsys.readouterr()
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["diverged_clients"] == [0, 1, 2, 3]
    assert all(m["diverged"] for m in result["final_metrics"]["per_client"].values())
    assert captured.err.count("diverged in round 1") == 4 and "DIVERGED" in captured.out
    assert "diverged in round 1" in next((tmp_path / "logs").glob("*.log")).read_text()
