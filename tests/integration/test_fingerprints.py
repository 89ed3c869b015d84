"""Phase 1 on real (tiny) models: fingerprints separate tasks for every family, and k=1 for one task."""
from __future__ import annotations

import numpy as np
import pytest

from atlasfl.data.batching import encode
from atlasfl.data.partition import make_shards
from atlasfl.data.tasks import TASK_SETS, load_task
from atlasfl.federation.client import fingerprint
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.registry import load_backbone
from atlasfl.phases.clustering import adjusted_rand, cluster_fingerprints


def _fingerprints(model, task_names, clients_per_task, seed, samples=64):
    tasks = [load_task(t) for t in task_names]
    shards = make_shards(tasks, clients_per_task, seed=seed, max_samples=samples + 16)
    fm = FederatedLoRAModel(load_backbone(model, seed=seed), alpha=16, dropout=0.0, seed=seed)
    labels = {t.name: t.num_labels for t in tasks}
    ups = [fingerprint(fm, encode(fm.backbone.tokenizer, s.train), num_labels=labels[s.task], samples=samples,
                       batch_size=8, layers=2, dim=64, seed=seed) for s in shards]
    truth = [task_names.index(s.task) for s in shards]
    return ups, truth, fm


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-qwen2", "tiny-llama"])
def test_representation_fingerprints_recover_the_tasks(model):
    for seed in (42, 123, 456):
        ups, truth, _ = _fingerprints(model, list(TASK_SETS["generated"]), 3, seed)
        F = np.stack([u["representation"] for u in ups])
        result = cluster_fingerprints(F, seed=seed, noise=float(np.mean([u["representation_noise"] for u in ups])))
        assert result.k == 4 and adjusted_rand(result.labels, truth) == 1.0, (model, seed, result)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-qwen2"])
def test_one_task_gives_one_cluster(model):
    ups, _, _ = _fingerprints(model, ["gen_topic"], 6, seed=7)
    noise = float(np.mean([u["representation_noise"] for u in ups]))
    result = cluster_fingerprints(np.stack([u["representation"] for u in ups]), seed=7, noise=noise)
    assert result.k == 1 and set(result.labels) == {0}, result


def test_fingerprint_leaves_the_base_frozen_and_untouched():
    ups, _, fm = _fingerprints("tiny-gpt2", ["gen_topic", "gen_pair"], 2, seed=3)
    assert not any(p.requires_grad for p in fm.backbone.model.parameters())
    assert all(p.grad is None for p in fm.backbone.model.parameters())
    for u in ups:
        assert u["representation"].shape == (64,) and u["gradient"].shape == (64,)
        assert set(u["importance"]) == set(fm.modules) and all(v > 0 for v in u["importance"].values())
    # same client, same seed: the same numbers (eval mode, no dropout)
    again, _, _ = _fingerprints("tiny-gpt2", ["gen_topic", "gen_pair"], 2, seed=3)
    assert np.array_equal(ups[0]["gradient"], again[0]["gradient"])
