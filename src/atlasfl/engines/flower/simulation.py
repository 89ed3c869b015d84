"""`atlas run ... --engine flower`: the Flower app on Flower's Simulation Runtime (Ray), one virtual
SuperNode per client, in this machine. Returns the same result dictionary as the in-process engine."""
from __future__ import annotations

import os

from atlasfl.config import RunConfig
from atlasfl.errors import AtlasError
from atlasfl.federation.records import num_clients
from atlasfl.models.registry import resolve_device


def run_flower(cfg: RunConfig, *, progress: bool = True, resume: bool = False) -> dict:
    """Run `cfg` through the Flower ServerApp and ClientApp on the Simulation Runtime.

    Flower's own progress log replaces the progress bar. The ServerApp checkpoints every round (with its
    copy of every client's state); with `resume` it continues from the last checkpoint and the new virtual
    SuperNodes get their states from it."""
    import warnings

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a research run sends nothing home unless asked
    from flwr.simulation import run_simulation

    from atlasfl.engines.flower.client_app import app as client_app
    from atlasfl.engines.flower.server_app import make_server_app

    results: list[dict | AtlasError] = []
    cpus = os.cpu_count() or 1
    # One CPU per virtual SuperNode; on CUDA the concurrent ones share the GPU (Ray hides it from 0-GPU actors).
    gpus = 1.0 / cpus if resolve_device(cfg.device).startswith("cuda") else 0.0
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                      "init_args": {"num_cpus": cpus, "include_dashboard": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=make_server_app(cfg.model_copy(update={"engine": "flower"}), sink=results.append,
                                                   resume=resume),
                       client_app=client_app, num_supernodes=num_clients(cfg), backend_config=backend_config)
    if not results:
        raise AtlasError("the Flower simulation ended without a result; its log above names the failing step")
    if isinstance(results[0], AtlasError):
        raise results[0]
    return results[0]
