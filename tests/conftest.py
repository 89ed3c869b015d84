"""Shared helpers: tiny end-to-end runs on random-initialised models and generated tasks."""
from __future__ import annotations

import warnings

import pytest
import torch

from atlasfl.config import build_config

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
# One thread per test worker: with xdist's 2 workers on 2 cores, more threads only contend.
torch.set_num_threads(1)

TINY_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-qwen2")
# Two binary tasks: every client's head has the same shape, so standard_fl can share all of its state.
BINARY_TASKS = ("gen_sentiment", "gen_pair")


def tiny_config(tmp_path, model="tiny-bert", method="fedavg_cluster", seed=0, **overrides):
    values = dict(tasks=BINARY_TASKS, clients_per_task=2, rounds=2, max_samples=24, max_test_samples=16,
                  batch_size=8, fingerprint_samples=8, output_dir=str(tmp_path / "results"),
                  log_dir=str(tmp_path / "logs"), checkpoint_dir=str(tmp_path / "checkpoints"))
    values.update(overrides)
    return build_config(model, seed, method, **values)


@pytest.fixture
def make_config(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


def pytest_collection_modifyitems(items):
    """Every test under tests/integration runs tiny models end to end: mark it `e2e`."""
    for item in items:
        if item.nodeid.startswith("tests/integration/"):
            item.add_marker(pytest.mark.e2e)
