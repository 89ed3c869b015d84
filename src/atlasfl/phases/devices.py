"""Simulated device profiles and the training-memory model of one client (docs/design.md §3.2).

The profiles are simulated: memory budget, relative compute and bandwidth are assumptions of the
experiment, not measurements of hardware. The memory model is an ESTIMATE from the model config;
runs report it next to the measured peak, labelled as such.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlasfl.errors import AtlasError

GIB = 1 << 30
# Trainable parameters in fp32: weight, gradient and AdamW's two moment estimates.
TRAINABLE_BYTES_PER_PARAM = 4 + 4 + 4 + 4


@dataclass(frozen=True)
class DeviceProfile:
    """A simulated client device. compute_ratio is throughput relative to gpu_16gb (= 1.0).

    mean_rank_cap caps the client's *mean* LoRA rank over its adapted modules: its total rank budget
    is mean_rank_cap × modules (docs/design.md §3.2), spread by layer importance, so an important module may
    get a rank above it while unimportant ones get less. No single module is capped by it; a module's
    rank is bounded only by the preset's largest rank candidate.
    """

    name: str
    memory_gb: float
    compute_ratio: float
    bandwidth_mbps: float
    mean_rank_cap: int

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("cpu_2gb", 2, 0.05, 10, 8),  # low-end phone / single-board computer
        DeviceProfile("tablet_4gb", 4, 0.15, 25, 16),
        DeviceProfile("laptop_8gb", 8, 0.35, 50, 32),
        DeviceProfile("gpu_16gb", 16, 1.0, 100, 64),  # desktop GPU
    )
}


# The simulated clock (docs/scale.md) is an ESTIMATE from these assumptions, not a measurement: a profile's compute
# rate is compute_ratio x REFERENCE_FLOPS, its bandwidth bandwidth_mbps each way.
REFERENCE_FLOPS = 10e12  # ASSUMED sustained training FLOP/s of gpu_16gb (compute_ratio 1.0), a 16 GB desktop GPU
# Training FLOPs per token and model parameter: forward 2, backward to the activations 2 (the frozen base takes no
# weight gradient; the adapters' own are negligible beside it). Kaplan et al.'s 6 counts full fine-tuning.
TRAIN_FLOPS_PER_PARAM_TOKEN = 4


def simulated_seconds(profile: DeviceProfile, *, params: int, tokens: int, bytes_down: int, bytes_up: int) -> float:
    """SIMULATED seconds of one client's round on `profile`: its training FLOPs (`tokens` through a model of
    `params` parameters) at the profile's compute rate, plus the bytes it receives and sends at its bandwidth."""
    compute = TRAIN_FLOPS_PER_PARAM_TOKEN * params * tokens / (profile.compute_ratio * REFERENCE_FLOPS)
    return compute + 8 * (bytes_down + bytes_up) / (profile.bandwidth_mbps * 1e6)


def check_profiles(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise AtlasError(f"unknown device profile(s) {', '.join(unknown)}; valid: {', '.join(PROFILES)}")


def draw_devices(num_clients: int, seed: int, mix: Sequence[str] | None = None) -> list[str]:
    """One profile name per client, drawn uniformly from `mix` with the seed; tasks play no part."""
    names = list(PROFILES) if mix is None else list(mix)
    if not names:
        raise AtlasError(f"the device mix is empty; valid profiles: {', '.join(PROFILES)}")
    check_profiles(names)
    if num_clients < 0:
        raise ValueError(f"num_clients must be non-negative, got {num_clients}")
    picks = np.random.default_rng(seed).integers(0, len(names), size=num_clients)
    return [names[i] for i in picks]


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs from a model config."""

    total_params: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    family: str  # 'bert' | 'gpt2' | 'llama'
    dtype_bytes: int


# Stored activations per token and layer, in elements: (× hidden, × intermediate, × heads·seq).
# After Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models":
# a GeLU block with dropout stores 34·s·b·h + 5·a·s²·b bytes in 16-bit, i.e. 9h + 2I (+ 2.5·a·s)
# elements with I = 4h and 1-byte dropout masks counted as half an element. A Llama-style block
# (RMSNorm, SwiGLU, no dropout) stores about 8h + 4I elements plus the softmax output (1·a·s).
# This counts full fine-tuning, so it over-estimates LoRA (frozen linears keep fewer inputs) and
# fused attention kernels that never materialise the s×s scores: an upper-side estimate.
ACTIVATION_FACTORS: dict[str, tuple[float, float, float]] = {
    "bert": (9.0, 2.0, 2.5),
    "gpt2": (9.0, 2.0, 2.5),
    "llama": (8.0, 4.0, 1.0),
}


# Eager autograd holds more than the stored activations at its peak (backward's gradient buffers,
# softmax/GELU temporaries), and a process's allocator keeps freed pages resident: headroom for that, so the
# estimate stays on the upper side (measured against the allocator: docs/performance.md, "The memory
# estimate"; guarded by tests/integration/test_memory_model.py).
EAGER_OVERHEAD = 1.5


def estimate_training_memory(
    facts: ModelFacts, *, batch_size: int, seq_len: int, lora_params: int, head_params: int
) -> dict[str, int]:
    """ESTIMATED bytes of one training step, per component, and their sum as 'total_estimate'.

    frozen_weights: params × dtype bytes; activations: the per-family count above times the eager
    overhead; lora and head: fp32 weights, grads and two AdamW states. Not a measurement.
    """
    if facts.family not in ACTIVATION_FACTORS:
        raise AtlasError(f"no memory model for family '{facts.family}'; known: {', '.join(ACTIVATION_FACTORS)}")
    per_hidden, per_intermediate, per_score = ACTIVATION_FACTORS[facts.family]
    tokens = batch_size * seq_len
    per_token_layer = (
        per_hidden * facts.hidden_size + per_intermediate * facts.intermediate_size
        + per_score * facts.num_heads * seq_len
    )
    parts = {
        "frozen_weights": facts.total_params * facts.dtype_bytes,
        "activations": int(tokens * facts.num_layers * per_token_layer * facts.dtype_bytes * EAGER_OVERHEAD),
        "lora": lora_params * TRAINABLE_BYTES_PER_PARAM,
        "head": head_params * TRAINABLE_BYTES_PER_PARAM,
    }
    parts["total_estimate"] = sum(parts.values())
    return parts


def fits(facts: ModelFacts, profile: DeviceProfile, *, batch_size: int, seq_len: int) -> bool:
    """Whether the frozen base weights and the activations of one step fit the device's budget."""
    need = estimate_training_memory(facts, batch_size=batch_size, seq_len=seq_len, lora_params=0, head_params=0)
    return need["total_estimate"] <= profile.memory_bytes
