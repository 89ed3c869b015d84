"""`atlas sweep --jobs N`: the grid's runs as N `atlas run` processes at once, each with its share of the CPU
threads (and one GPU of `--gpus`, round robin by CUDA_VISIBLE_DEVICES), a live table of their state and one log
per run. A failed run does not stop the others; finished runs are skipped, an interrupted one resumes from its
checkpoint. With --tune, the first run of a method (which runs its study) goes before that method's other seeds,
so every study is run by one process, as a sequential sweep runs it. With `--ray-address` the same runs are Ray
tasks on a cluster (`RayRun`), each asking for its CPUs and GPU, under the same loop."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atlasfl.config import RunConfig
from atlasfl.config_file import config_file_text
from atlasfl.errors import AtlasError
from atlasfl.experiment import is_complete
from atlasfl.sweep import SweepOutcome


@dataclass
class Job:
    cfg: RunConfig
    after: str | None = None  # the run that must finish first (it runs the study this one reuses)
    state: str = "waiting"
    process: subprocess.Popen | RayRun | None = None
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


def run_command(config: Path, overwrite: bool) -> list[str]:
    return [sys.executable, "-m", "atlasfl.cli.app", "run", "--config", str(config),
            "--overwrite" if overwrite else "--resume"]


def write_config(job: Job) -> Path:
    """The run's settings as a config file beside its log."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    config = job.log.with_suffix(".toml")
    config.write_text(config_file_text(job.cfg.model_dump(mode="json"), job.cfg.run_name))
    return config


def thread_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def launch(job: Job, slot: int, jobs: int, gpus: list[str], overwrite: bool) -> None:
    """Start one `atlas run --config FILE` process: threads cpu_count // jobs, the slot's GPU."""
    config = write_config(job)
    env = thread_env(max(1, (os.cpu_count() or 1) // jobs))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    with job.log.open("w") as out:
        job.process = subprocess.Popen(run_command(config, overwrite), stdout=out, stderr=subprocess.STDOUT, env=env)
    job.state, job.started = "running", time.monotonic()


def _ray_run(config_text: str, config: str, cwd: str, overwrite: bool, threads: int) -> int:
    """On a Ray worker: the run's config file and `atlas run` process, its output in the log beside the config,
    all at the paths the sweep gave, relative ones from the sweep's folder (its files are where the sweep looks on
    one machine or a shared file system, on the worker's disk otherwise); Ray has set CUDA_VISIBLE_DEVICES to the
    task's GPU, if any."""
    folder = Path(cwd)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text)
    with path.with_suffix(".out").open("w") as out:
        return subprocess.run(run_command(path, overwrite), cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                              env=thread_env(threads)).returncode


class RayRun:
    """One run as a Ray task, seen by the sweep's loop as a process is (`poll`, `returncode`, `terminate`)."""

    def __init__(self, job: Job, overwrite: bool, cpus: int, gpus: int):
        import ray

        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_run)
        config = write_config(job)
        self.ref = task.remote(config.read_text(), str(config), os.getcwd(), overwrite, cpus)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        import ray

        if self.returncode is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.returncode = ray.get(self.ref)
            except ray.exceptions.RayError:  # the worker or its node died: the run failed, its checkpoint is kept
                self.returncode = -1
        return self.returncode

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


def ray_launcher(address: str, jobs: int, gpus: bool):
    """`launch` for a Ray cluster at `address` (`auto`, HOST:PORT or ray://HOST:PORT): each run asks for the
    cluster's CPUs // jobs (at least one) and one GPU if `gpus`; Ray places it where they are free."""
    import ray

    def unreachable(why: str) -> AtlasError:
        return AtlasError(f"cannot reach the Ray cluster at {address!r} ({' '.join(why.split())[:200]}); start one "
                          "with `ray start --head` or give its address (--ray-address HOST:PORT)")

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # Ray itself retries an address that refuses for minutes before it gives up
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise unreachable(str(exc)) from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise unreachable(str(exc)) from None
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // jobs)

    def launch_on_ray(job: Job, slot: int, jobs: int, _gpus: list[str], overwrite: bool) -> None:
        job.process = RayRun(job, overwrite, cpus, 1 if gpus else 0)
        job.state, job.started = "running", time.monotonic()

    return launch_on_ray


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def run_jobs(configs: list[RunConfig], *, jobs: int, gpus: list[str] = (), overwrite: bool = False,
             show: Callable[[list[Job]], None] = lambda _: None, poll_s: float = 0.5,
             start: Callable[..., None] = launch) -> SweepOutcome:
    """Run the grid `jobs` at a time, each started by `start` (a local process, or `ray_launcher`'s task);
    `show(jobs)` is called whenever a state changes (the live table)."""
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
                    start(job, free, jobs, list(gpus), overwrite)
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
