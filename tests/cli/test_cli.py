"""The CLI and the seed's scripts: valid runs, and every invalid-argument path exits non-zero with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlasfl.cli.app import main
from atlasfl.config import build_config

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--tasks", "gen_sentiment", "--tasks", "gen_pair", "--clients-per-task", "2", "--rounds", "1",
         "--max-samples", "16", "--max-test-samples", "8", "--batch-size", "8"]


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_run_writes_result_named_like_the_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "tiny-gpt2", "7", "standard_fl", *SMALL])
    assert code == 0
    path = tmp_path / "results" / "atlas_tiny-gpt2_standard_fl_seed7_r1.json"
    assert json.loads(path.read_text())["status"] == "complete"
    assert (tmp_path / "logs" / "atlas_tiny-gpt2_standard_fl_seed7_r1.log").exists()
    assert str(path.relative_to(tmp_path)) in capsys.readouterr().out.replace("\n", "")


def test_atlas_runs_at_other_etas_or_swept_get_names_of_their_own():
    names = {build_config("gpt2", 42, "atlas", **kw).run_name
             for kw in ({}, {"eta": 0.5}, {"lambda_sweep": True}, {"lambda_sweep": True, "eta": 0.5})}
    assert names == {"atlas_gpt2_atlas_seed42_r10", "atlas_gpt2_atlas_seed42_r10_eta0.5",
                     "atlas_gpt2_atlas_seed42_r10_lsweep"}
    # methods without an eta keep the seed's name whatever the eta settings say
    name = build_config("gpt2", 42, "fedavg_cluster", lambda_sweep=True).run_name
    assert name == "atlas_gpt2_fedavg_cluster_seed42_r10"


def test_existing_result_is_not_overwritten(tmp_path, capsys):
    args = ["run", "tiny-bert", "3", "local_only", *SMALL, "--output-dir", str(tmp_path)]
    assert main(args) == 0
    path = tmp_path / "atlas_tiny-bert_local_only_seed3_r1.json"
    before = path.read_bytes()
    capsys.readouterr()
    _one_line_error(capsys, main(args), "--overwrite")
    assert path.read_bytes() == before


@pytest.mark.parametrize("args, needles", [
    (["run", "no-such-model", "1", "atlas"], ["unknown model", "minilm"]),
    (["run", "tiny-bert", "1", "no_such_method"], ["unknown method", "local_only"]),
    (["run", "tiny-bert", "abc", "atlas"], ["seed", "integer"]),
    (["run", "tiny-bert", "-5", "atlas"], ["seed"]),
    (["run", "tiny-bert", "1", "atlas", "--rounds", "0"], ["--rounds"]),
    (["run", "tiny-bert", "1", "atlas", "--batch-size", "-1"], ["--batch-size"]),
    (["run", "tiny-bert", "1", "atlas", "--lr", "0"], ["--lr"]),
    (["run", "tiny-bert", "1", "atlas", "--tasks", "mnli"], ["unknown task", "sst2"]),
    (["run", "tiny-bert", "1", "atlas", "--mode", "fast"], ["--mode"]),
    (["run", "tiny-bert", "1", "atlas", "--init", "zeros"], ["--init"]),
    (["run", "tiny-bert", "1", "atlas", "--data-dir", "/no/such/dir"], ["--data-dir"]),
    (["run", "tiny-bert", "1", "atlas", "--clients-per-task", "500", "--tasks", "gen_pair", "--max-samples", "2"],
     ["too few"]),
    (["run", "tiny-bert"], ["Missing argument"]),
])
def test_bad_input_is_one_line_and_nonzero(args, needles, capsys, tmp_path):
    _one_line_error(capsys, main([*args, "--output-dir", str(tmp_path)] if len(args) > 2 else args), *needles)
    assert not list(tmp_path.glob("*.json"))


def test_presets_lists_the_seed_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for model in ("distilbert", "gpt2", "gpt2-xl", "qwen2.5"):
        assert model in out
    assert "4,8,16,32,48" in out and "2e-05" in out


def _script(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "atlas").exists(), reason="scripts call .venv/bin/atlas")
def test_seed_scripts_are_thin_wrappers(tmp_path):
    out = _script(str(ROOT / "gpu2_seed456.sh"), "tiny-bert", "fedavg_cluster", *SMALL, "--output-dir", str(tmp_path),
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "atlas_tiny-bert_fedavg_cluster_seed456_r1.json").exists()
    bad = _script(str(ROOT / "run_experiment.sh"), "tiny-bert", cwd=tmp_path)
    assert bad.returncode != 0 and "usage" in bad.stderr
    bad = _script(str(ROOT / "run_experiment.sh"), "tiny-bert", "1", "nope", cwd=tmp_path)
    assert bad.returncode != 0 and "unknown method" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_atlas_integrated_accepts_the_seed_flags(tmp_path):
    script = ROOT / "experiments" / "atlas_integrated.py"
    ok = _script(sys.executable, str(script), "--mode", "quick", "--model", "tiny-qwen2", "--ablation", "local_only",
                 "--seed", "5", "--rounds", "1", "--batch-size", "8", "--lr", "0.001", "--fingerprint-samples", "4",
                 "--tasks", "gen_sentiment", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "atlas_tiny-qwen2_local_only_seed5_r1.json").exists()
    bad = _script(sys.executable, str(script), "--ablation", "no_such_method", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "local_only" in bad.stderr


def test_bench_scaling_runs_the_models_and_sizes_asked_for(monkeypatch, capsys):
    seen = []

    def fake_rows(model, settings):
        seen.append((model, settings["clients_per_task"], settings["init"], settings["rounds"]))
        assert settings["client_batch_rows"] == 96  # the scaling steps cap a client-batched pass
        return [[model, str(4 * settings["clients_per_task"]), "plain loop", *["0"] * 9, "1.00x"]]

    monkeypatch.setattr("atlasfl.bench.bench_rows", fake_rows)  # `atlas bench` imports it when run
    assert main(["bench", "identical", "--scaling", "--model", "minilm", "--clients-per-task", "24"]) == 0
    assert seen == [("minilm", 24, "pretrained", 1)]
    seen.clear()
    assert main(["bench", "identical", "--scaling"]) == 0  # the default sweep: 3 models x 12/48/96 clients
    models = ("tiny-bert", "minilm", "distilbert")
    assert [(m, c) for m, c, _, _ in seen] == [(m, c) for m in models for c in (3, 12, 24)]
    assert {i for m, _, i, _ in seen if m != "minilm"} == {"random"}
    assert "peak memory" in capsys.readouterr().out


def test_bench_methods_names_an_unknown_method_in_one_line(capsys):
    assert main(["bench", "identical", "--methods", "standard_fl,no_such"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['no_such']" in err and "flexlora" in err


HEAVY = ("torch", "transformers", "peft", "flwr", "datasets", "sklearn", "scipy", "matplotlib", "optuna")
HELP_PROBE = """
import sys
from typer.testing import CliRunner
from atlasfl.cli.app import app
COMMANDS = ("run", "demo", "presets", "sweep", "tune", "report", "config", "bench")
for args in (["--help"], *([c, "--help"] for c in COMMANDS)):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output, (args, result.output)
print(" ".join(m for m in sys.argv[1:] if m in sys.modules))
"""


def test_help_of_atlas_and_of_every_command_imports_no_torch_or_other_heavy_library():
    import atlasfl

    src = str(Path(atlasfl.__file__).resolve().parents[1])  # the subprocess imports this same atlasfl
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, *HEAVY], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []  # imported by a command when it runs, never by its help
