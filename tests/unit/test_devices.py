import inspect
from collections import Counter

import pytest

from atlasfl.errors import AtlasError
from atlasfl.phases.devices import PROFILES, ModelFacts, draw_devices, estimate_training_memory, fits

GPT2_XL = ModelFacts(1_557_611_200, 1600, 48, 6400, 25, 50257, "gpt2", 4)
DISTILBERT = ModelFacts(66_955_010, 768, 6, 3072, 12, 30522, "bert", 4)
QWEN = ModelFacts(494_032_768, 896, 24, 4864, 14, 151936, "llama", 4)


def test_profiles():
    caps = {name: p.mean_rank_cap for name, p in PROFILES.items()}
    assert caps == {"cpu_2gb": 8, "tablet_4gb": 16, "laptop_8gb": 32, "gpu_16gb": 64}
    assert [p.memory_gb for p in PROFILES.values()] == [2, 4, 8, 16]
    assert PROFILES["cpu_2gb"].memory_bytes == 2 * 1024**3


def memory(facts=DISTILBERT, batch_size=16, seq_len=128, lora_params=100_000, head_params=1_538):
    return estimate_training_memory(
        facts, batch_size=batch_size, seq_len=seq_len, lora_params=lora_params, head_params=head_params
    )


def test_components_and_total():
    m = memory()
    assert set(m) == {"frozen_weights", "activations", "lora", "head", "total_estimate"}
    assert m["frozen_weights"] == DISTILBERT.total_params * 4
    assert m["lora"] == 100_000 * 16 and m["head"] == 1_538 * 16
    assert m["total_estimate"] == m["frozen_weights"] + m["activations"] + m["lora"] + m["head"]
    assert all(isinstance(v, int) for v in m.values())


@pytest.mark.parametrize("facts", [DISTILBERT, GPT2_XL, QWEN])
def test_monotone(facts):
    base = memory(facts)["total_estimate"]
    assert memory(facts, batch_size=32)["total_estimate"] > base
    assert memory(facts, seq_len=256)["total_estimate"] > base
    assert memory(facts, lora_params=200_000)["total_estimate"] > base
    assert memory(facts, seq_len=256)["activations"] > 2 * memory(facts)["activations"]  # attention scores: s²


def test_feasibility():
    assert not fits(GPT2_XL, PROFILES["cpu_2gb"], batch_size=8, seq_len=128)
    assert not fits(QWEN, PROFILES["cpu_2gb"], batch_size=12, seq_len=128)
    assert fits(DISTILBERT, PROFILES["cpu_2gb"], batch_size=16, seq_len=128)
    assert fits(GPT2_XL, PROFILES["gpu_16gb"], batch_size=8, seq_len=128)


def test_unknown_family():
    with pytest.raises(AtlasError):
        memory(ModelFacts(1, 1, 1, 1, 1, 1, "t5", 4))


def test_draws_seeded_and_task_free():
    assert "task" not in " ".join(inspect.signature(draw_devices).parameters)
    assert draw_devices(12, 42) == draw_devices(12, 42)
    assert draw_devices(12, 42) != draw_devices(12, 123)
    # Over many seeds every client position (hence every task's block of 3) sees each profile ~1/4.
    counts = [Counter() for _ in range(12)]
    for seed in range(2000):
        for k, name in enumerate(draw_devices(12, seed)):
            counts[k][name] += 1
    for task in range(4):
        block = sum((counts[k] for k in range(3 * task, 3 * task + 3)), Counter())
        assert set(block) == set(PROFILES)
        assert all(abs(n / 6000 - 0.25) < 0.03 for n in block.values())


def test_mix():
    assert set(draw_devices(50, 0, mix=["cpu_2gb", "gpu_16gb"])) == {"cpu_2gb", "gpu_16gb"}
    assert draw_devices(5, 0, mix=["laptop_8gb"]) == ["laptop_8gb"] * 5


def test_unknown_profile_lists_valid_names():
    with pytest.raises(AtlasError, match="phone_1gb.*cpu_2gb, tablet_4gb, laptop_8gb, gpu_16gb"):
        draw_devices(3, 0, mix=["cpu_2gb", "phone_1gb"])
    with pytest.raises(AtlasError):
        draw_devices(3, 0, mix=[])
