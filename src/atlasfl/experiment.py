"""One implementation behind every face (CLI, seed scripts, sweeps): run a config, validate, save."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from atlasfl.config import RunConfig
from atlasfl.errors import AtlasError
from atlasfl.results.io import atomic_write_json
from atlasfl.results.schema import validate_result

log = logging.getLogger("atlasfl")


def is_complete(path: Path) -> bool:
    """A result file counts as done when it parses, validates and says so."""
    try:
        data = json.loads(path.read_text())
        return data.get("status") == "complete" and validate_result(data) is not None
    except (OSError, ValueError):
        return False


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".atlas-write-test"
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
    return log_path


def run_and_save(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[dict, Path]:
    """Run `cfg` and write its result JSON atomically; an existing complete result is kept unless `overwrite`."""
    path = cfg.result_path
    if path.exists() and is_complete(path) and not overwrite:
        raise AtlasError(f"{path} already holds a complete result; pass --overwrite to replace it")
    check_writable(path.parent)
    setup_logging(cfg)
    from atlasfl.federation.simulation import run_experiment

    result = run_experiment(cfg, progress=progress)
    validate_result(result)
    try:
        atomic_write_json(path, result)
    except OSError as exc:
        raise AtlasError(f"could not write {path} ({exc.strerror}); the previous file, if any, is unchanged") from None
    log.info("wrote %s", path)
    return result, path
