"""`atlas sweep --jobs N`: the grid's runs as N `atlas run` processes at once, each with its share of the CPU
threads (and one GPU of `--gpus`, round robin by CUDA_VISIBLE_DEVICES), a live table of their state and one log
per run. A failed run does not stop the others; finished runs are skipped, an interrupted one resumes from its
checkpoint. With --tune, the first run of a method (which runs its study) goes before that method's other seeds,
so every study is run by one process, as a sequential sweep runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atlasfl.config import RunConfig
from atlasfl.config_file import config_file_text
from atlasfl.experiment import is_complete
from atlasfl.sweep import SweepOutcome


@dataclass
class Job:
    cfg: RunConfig
    after: str | None = None  # the run that must finish first (it runs the study this one reuses)
    state: str = "waiting"
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0

    @property
    def log(self) -> Path:
        return Path(self.cfg.log_dir) / "sweep" / f"{self.cfg.run_name}.out"


def study_key(cfg: RunConfig) -> str:
    """Runs that share one study: the same run but for the seed."""
    return cfg.run_name.replace(f"_seed{cfg.seed}_", "_seed*_")


def plan_jobs(configs: list[RunConfig]) -> list[Job]:
    first: dict[str, str] = {}
    jobs = []
    for cfg in configs:
        key = study_key(cfg)
        jobs.append(Job(cfg, after=first.get(key) if cfg.tune else None))
        first.setdefault(key, cfg.run_name)
    return jobs


def launch(job: Job, slot: int, jobs: int, gpus: list[str], overwrite: bool) -> None:
    """Start one `atlas run --config FILE` process: threads cpu_count // jobs, the slot's GPU."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    config = job.log.with_suffix(".toml")
    config.write_text(config_file_text(job.cfg.model_dump(mode="json"), job.cfg.run_name))
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    command = [sys.executable, "-m", "atlasfl.cli.app", "run", "--config", str(config),
               "--overwrite" if overwrite else "--resume"]
    with job.log.open("w") as out:
        job.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    job.state, job.started = "running", time.monotonic()


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def run_jobs(configs: list[RunConfig], *, jobs: int, gpus: list[str] = (), overwrite: bool = False,
             show: Callable[[list[Job]], None] = lambda _: None, poll_s: float = 0.5) -> SweepOutcome:
    """Run the grid `jobs` at a time; `show(jobs)` is called whenever a state changes (the live table)."""
    outcome, queue = SweepOutcome(), plan_jobs(configs)
    for job in queue:
        if not overwrite and is_complete(job.cfg.result_path):
            job.state = "skipped"
            outcome.skipped.append(job.cfg.run_name)
    slots: dict[int, Job] = {}
    try:
        while any(j.state in ("waiting", "running") for j in queue):
            for slot, job in list(slots.items()):
                job.seconds = time.monotonic() - job.started
                if job.process.poll() is None:
                    continue
                del slots[slot]
                if job.process.returncode == 0:
                    job.state = "done"
                    outcome.ran.append(job.cfg.run_name)
                else:
                    job.state = "FAILED"
                    outcome.failed.append((job.cfg.run_name, f"{last_line(job.log)} (log: {job.log})"))
            states = {j.cfg.run_name: j.state for j in queue}
            for job in queue:
                free = next((s for s in range(jobs) if s not in slots), None)
                if free is None:
                    break
                if job.state == "waiting" and states.get(job.after, "done") in ("done", "skipped"):
                    launch(job, free, jobs, list(gpus), overwrite)
                    slots[free] = job
                elif job.state == "waiting" and states.get(job.after) == "FAILED":
                    job.state = "FAILED"
                    outcome.failed.append((job.cfg.run_name, f"its study's first run {job.after} failed"))
            show(queue)
            time.sleep(poll_s)
    finally:
        for job in slots.values():  # an interrupted sweep stops its runs; each keeps its last checkpoint
            job.process.terminate()
    show(queue)
    return outcome
