"""Shared helpers: tiny end-to-end runs on random-initialised models and generated tasks."""
from __future__ import annotations

import json
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


@pytest.fixture(autouse=True)
def fresh_phase1():
    """Every test's runs compute their own phase 1: none takes the fingerprints of another test's run."""
    from atlasfl.engines import inprocess

    inprocess._last_phase1.clear()


def pytest_collection_modifyitems(items):
    """Every test under tests/integration runs tiny models end to end: mark it `e2e`."""
    for item in items:
        if item.nodeid.startswith("tests/integration/"):
            item.add_marker(pytest.mark.e2e)


def force_clusters(monkeypatch, labels):
    """Make the server aggregate by `labels` (client-id order) whatever phase 1 found, in both engines
    (the Flower ServerApp runs in this process). Ranks are still planned from the discovered clusters."""
    from atlasfl.federation.server import Server

    adopt = Server.adopt

    def forced(self, plan):
        plan.cluster_labels = list(labels)
        adopt(self, plan)

    monkeypatch.setattr(Server, "adopt", forced)


def comparable(result: dict) -> dict:
    """A result without what may differ between two runs of one config (times, memory, environment, folders)."""
    out = json.loads(json.dumps(result))
    for key in ("time_metrics", "memory", "environment"):
        out.pop(key)
    for key in ("output_dir", "log_dir", "checkpoint_dir"):
        out["config"].pop(key)
    for r in out["round_metrics"]:
        r.pop("time_s")
    return out


HETERO_DEVICES = ("cpu_2gb", "gpu_16gb")  # two device profiles: unequal ranks across clients


def saved_result(cfg) -> dict:
    """Run `cfg` in its engine and return the result file it wrote, checked against the schema."""
    from atlasfl.experiment import run_and_save
    from atlasfl.results.schema import validate_result

    _, path = run_and_save(cfg, progress=False)
    on_disk = json.loads(path.read_text())
    validate_result(on_disk)
    return on_disk


def outcome(result: dict) -> tuple[list, dict]:
    """Every round's state digests and the final metrics: what two engines (or two runs) must agree on."""
    return [r["state_digests"] for r in result["round_metrics"]], result["final_metrics"]


@pytest.fixture
def deliveries(monkeypatch):
    """Every in-process delivery of the next run, as (round, states before, states after, the transport)."""
    from atlasfl.engines.inprocess import InProcess

    seen = []
    deliver = InProcess.deliver

    def spy(self, states, round_idx):
        before = self.states()
        sent = deliver(self, states, round_idx)
        seen.append((round_idx, before, self.states(), self))
        return sent

    monkeypatch.setattr(InProcess, "deliver", spy)
    return seen


def state_floats(model: str, ranks: dict[str, int], num_labels: int) -> int:
    """Numbers in one client's trainable state, counted from the model itself: Σ_m r_m·(d_in + d_out)
    over the adapted projections, plus the head's weight (and bias, on encoders)."""
    from atlasfl.models.lora import FederatedLoRAModel
    from atlasfl.models.registry import load_backbone

    fm = FederatedLoRAModel(load_backbone(model, init="random"), alpha=16.0, dropout=0.0, seed=0)
    shapes = fm.module_shapes()
    assert set(ranks) == set(shapes)
    head = sum(p.numel() for p in fm.new_head(num_labels).parameters())
    return sum(r * (shapes[m][0] + shapes[m][1]) for m, r in ranks.items()) + head


def peft_oracle_adapters(alpha: float, ranks: list[int], d_in: int, d_out: int, seed: int = 0):
    """A one-Linear peft model (float64) with one adapter per rank ("default", "c1", ...) set to seeded random
    factors: the oracle for merges that peft's `add_weighted_adapter` also computes. Returns the peft model, its
    layer, the adapter names and each adapter's (A, B)."""
    import torch
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).double(),
                           LoraConfig(r=ranks[0], lora_alpha=alpha, target_modules=["0"], init_lora_weights=False))
    for k, r in enumerate(ranks[1:], 1):
        model.add_adapter(f"c{k}", LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))
    layer = model.base_model.model[0]
    names = ["default"] + [f"c{k}" for k in range(1, len(ranks))]
    factors = []
    for name, r in zip(names, ranks):
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        layer.lora_A[name].weight.data.copy_(A)
        layer.lora_B[name].weight.data.copy_(B)
        factors.append((A, B))
    return model, layer, names, factors


def interrupt_at_checkpoint(cfg, monkeypatch, write: int) -> None:
    """Run `cfg` until its `write`-th checkpoint write (1: the plan, r + 1: round r's) raises KeyboardInterrupt, as
    Ctrl-C there would; the writes before it are complete checkpoints to resume from."""
    import atlasfl.results.checkpoint as ckpt
    from atlasfl.experiment import run_and_save

    real, calls = ckpt.save_file, []

    def dying_writer(tensors, filename):
        calls.append(filename)
        if len(calls) == write:
            raise KeyboardInterrupt
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        run_and_save(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_file", real)
