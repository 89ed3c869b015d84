"""Per-model presets: the seed runner's table (batch, lr, local epochs, fingerprint samples, ranks)."""
from __future__ import annotations

from dataclasses import dataclass, field

ROUNDS = 10
TASKS = ("sst2", "mrpc", "cola", "qnli")
CLIENTS_PER_TASK = 3
MAX_SAMPLES = 3000


@dataclass(frozen=True)
class Preset:
    model: str
    batch_size: int
    lr: float
    local_epochs: int
    # Examples per client for the gradient pass of phase 1 (gradient fingerprint, layer importances), the seed's
    # figure. The representation fingerprint needs forward passes only and reads up to
    # RunConfig.representation_samples (512) training examples whatever this says (docs/clustering.md).
    fingerprint_samples: int
    rank_candidates: tuple[int, ...]
    rounds: int = ROUNDS
    tasks: tuple[str, ...] = TASKS
    clients_per_task: int = CLIENTS_PER_TASK
    max_samples: int = MAX_SAMPLES
    notes: str = field(default="", compare=False)


PRESETS: dict[str, Preset] = {
    "distilbert": Preset("distilbert", 16, 3e-5, 2, 100, (4, 8, 16, 32), notes="DistilBERT-base-uncased, 66M"),
    "gpt2": Preset("gpt2", 16, 3e-5, 2, 100, (4, 8, 16, 32), notes="GPT-2, 124M"),
    "gpt2-xl": Preset("gpt2-xl", 8, 2e-5, 3, 25, (4, 8, 16, 32, 64), notes="GPT-2 XL, 1.558B"),
    "qwen2.5": Preset("qwen2.5", 12, 3e-5, 2, 80, (4, 8, 16, 32, 48), notes="Qwen/Qwen2.5-0.5B, 494M"),
    # Offline and test models (not in the seed's table): packaged MiniLM and tiny random models.
    "minilm": Preset("minilm", 16, 5e-4, 1, 64, (4, 8, 16, 32), notes="packaged all-MiniLM-L6-v2, 22.7M (offline)"),
    "tiny-bert": Preset("tiny-bert", 8, 1e-3, 1, 64, (2, 4, 8, 16), notes="random tiny BERT (tests)"),
    "tiny-gpt2": Preset("tiny-gpt2", 8, 1e-3, 1, 64, (2, 4, 8, 16), notes="random tiny GPT-2 (tests)"),
    "tiny-llama": Preset("tiny-llama", 8, 1e-3, 1, 64, (2, 4, 8, 16), notes="random tiny Llama (tests)"),
    "tiny-qwen2": Preset("tiny-qwen2", 8, 1e-3, 1, 64, (2, 4, 8, 16), notes="random tiny Qwen2 (tests)"),
}

# Models without their own row (hub ids, local folders) use this one.
DEFAULT_PRESET = PRESETS["distilbert"]


def preset_for(model: str) -> Preset:
    return PRESETS.get(model, DEFAULT_PRESET)
