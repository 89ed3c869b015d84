"""A grid of runs (models × methods × seeds) over the one run implementation, `experiment.run_and_save`:
finished runs are skipped, so an interrupted sweep resumes, and one failed run never stops the rest."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from atlasfl.config import RunConfig, build_config
from atlasfl.errors import AtlasError, RunInterrupted
from atlasfl.experiment import is_complete, run_and_save

log = logging.getLogger("atlasfl")


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, one-line reason)


def grid_configs(models: Iterable[str], methods: Iterable[str], seeds: Iterable[int], **overrides) -> list[RunConfig]:
    """Every config of the grid, validated before anything runs. Order: model, seed, method, so each
    finished seed is a complete block for paired comparisons even if the sweep stops early."""
    return [build_config(model, seed, method, **overrides)
            for model in dict.fromkeys(models) for seed in dict.fromkeys(seeds) for method in dict.fromkeys(methods)]


def run_sweep(configs: list[RunConfig], *, overwrite: bool = False, say: Callable[[str], None] = print) -> SweepOutcome:
    """Run each config in turn; a complete result is kept unless `overwrite`."""
    outcome = SweepOutcome()
    for i, cfg in enumerate(configs, 1):
        tag = f"[{i}/{len(configs)}] {cfg.run_name}"
        if not overwrite and is_complete(cfg.result_path):
            say(f"{tag}: complete, skipped")
            outcome.skipped.append(cfg.run_name)
            continue
        say(f"{tag}: running")
        try:
            run_and_save(cfg, overwrite=overwrite, resume=not overwrite)  # a run cut off mid-way continues
        except RunInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the grid; it is listed at the end
            reason = " ".join(str(exc).split())
            if not isinstance(exc, AtlasError):  # a crash, not a user error: keep its traceback in the run's log
                log.exception("run %s failed", cfg.run_name)
                reason = f"{type(exc).__name__}: {reason} (traceback in {Path(cfg.log_dir) / cfg.run_name}.log)"
            outcome.failed.append((cfg.run_name, reason))
            say(f"{tag}: FAILED: {reason}")
        else:
            outcome.ran.append(cfg.run_name)
    return outcome
