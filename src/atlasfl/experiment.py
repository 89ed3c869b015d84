"""One implementation behind every face (CLI, seed scripts, sweeps): run a config, validate, save."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from atlasfl.config import RunConfig
from atlasfl.errors import AtlasError, RunInterrupted
from atlasfl.results.io import atomic_write_json
from atlasfl.results.schema import validate_result

log = logging.getLogger("atlasfl")


def is_complete(path: Path) -> bool:
    """A result file counts as done when it parses, validates and says so."""
    try:
        data = json.loads(path.read_text())
        validate_result(data)
    except (OSError, ValueError):
        return False
    return data.get("status") == "complete"


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".atlas-write-test-{os.getpid()}"  # its own: runs started at once share the folder
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AtlasError(f"cannot write to results folder {folder} ({exc.strerror}); "
                         "choose another with --output-dir") from None


def setup_logging(cfg: RunConfig) -> Path:
    log_path = Path(cfg.log_dir) / f"{cfg.run_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    for noisy in ("huggingface_hub", "datasets", "transformers"):  # their retries and notices belong in the log
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # our own bars show rounds; theirs would clutter errors and logs
    transformers.utils.logging.disable_progress_bar()
    return log_path


@contextmanager
def interrupts_raise():
    """Turn SIGINT/SIGTERM into RunInterrupted for the duration (main thread only)."""
    def handler(signum, _frame):
        raise RunInterrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command() -> str:
    """The command line that continues this run: `atlas run` gets --resume; a sweep resumes by itself."""
    args = [Path(sys.argv[0]).name if sys.argv[0].endswith("atlas") else "atlas", *sys.argv[1:]]
    return shlex.join(args if "--resume" in args or "run" not in args else [*args, "--resume"])


def run_and_save(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True,
                 resume: bool = False) -> tuple[dict, Path]:
    """Run `cfg` and write its result JSON atomically; an existing complete result is kept unless `overwrite`.

    With `resume`, a finished run is reported as such and an interrupted one continues from its checkpoint.
    """
    path = cfg.result_path
    if path.exists() and is_complete(path) and not overwrite:
        if resume:
            print(f"{cfg.run_name} is already complete: {path}", file=sys.stderr)
            return json.loads(path.read_text()), path
        raise AtlasError(f"{path} already holds a complete result; pass --overwrite to replace it")
    check_writable(path.parent)
    setup_logging(cfg)
    from atlasfl.engines.flower.simulation import run_flower
    from atlasfl.engines.inprocess import run_experiment

    run_cfg, tuning = cfg, None
    try:
        with interrupts_raise():
            if cfg.tune:  # the study first (continued if it exists), then the run with its best settings
                from atlasfl.tuning import tuned_run

                run_cfg, tuning = tuned_run(cfg, say=lambda line: print(line, file=sys.stderr))
                setup_logging(cfg)  # the trials logged to their own files
            result = (run_flower if cfg.engine == "flower" else run_experiment)(run_cfg, progress=progress,
                                                                                 resume=resume)
    except RunInterrupted as exc:
        log.warning("interrupted by %s", exc)
        print(f"atlas: interrupted ({exc}); checkpoints are in {cfg.checkpoint_path}; continue with:\n"
              f"  {resume_command()}", file=sys.stderr)
        raise
    if tuning is not None:  # filed under the untuned name: a tuned sweep's runs are found before they are tuned
        result.update(run_name=cfg.run_name, tuning=tuning)
    validate_result(result)
    try:
        atomic_write_json(path, result)
    except OSError as exc:
        raise AtlasError(f"could not write {path} ({exc.strerror}); the previous file, if any, is unchanged") from None
    log.info("wrote %s", path)
    return result, path
