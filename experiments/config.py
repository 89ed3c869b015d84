"""Seed interface: the per-model presets, importable as `experiments.config` (see atlasfl.presets)."""
from atlasfl.presets import CLIENTS_PER_TASK, MAX_SAMPLES, PRESETS, ROUNDS, TASKS, Preset, preset_for

MODEL_CONFIGS = {name: p for name, p in PRESETS.items()}

__all__ = ["CLIENTS_PER_TASK", "MAX_SAMPLES", "MODEL_CONFIGS", "PRESETS", "ROUNDS", "TASKS", "Preset", "preset_for"]
