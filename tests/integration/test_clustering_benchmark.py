"""benchmarks/clustering.py reuses each example's representation across seeds (how fifty seeds of a full-size
model fit on a CPU): the client's `fingerprint` fed from the store must upload what it uploads from its own
representation pass, and a second store on the same folder must find every row instead of computing it again."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from atlasfl.data.batching import encode
from atlasfl.federation.fingerprint import fingerprint
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.registry import load_backbone

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "clustering.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("clustering_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reused_representations_upload_what_the_client_uploads_and_a_second_call_resumes(tmp_path):
    bench = _benchmark()
    a = bench.arguments(["tiny-bert", "--tasks", "generated", "--max-samples", "40", "--clients-per-task", "2",
                         "--fingerprint-samples", "4", "--batch-size", "8"])
    cfg, tasks, shards = bench.run_setup("tiny-bert", 0, a)
    fm = FederatedLoRAModel(load_backbone("tiny-bert", seed=0), alpha=cfg.lora_alpha, dropout=0.0, seed=0)
    encoded = {s.client_id: encode(fm.backbone.tokenizer, s.train, cfg.max_length) for s in shards}
    store = bench.RepresentationStore(tmp_path / "store")
    for s in shards:
        kw = dict(num_labels=tasks[s.task].num_labels, samples=cfg.fingerprint_samples, batch_size=cfg.batch_size,
                  layers=cfg.fingerprint_layers, dim=cfg.fingerprint_dim, seed=cfg.seed,
                  representation_samples=cfg.representation_samples)
        own = fingerprint(fm, encoded[s.client_id], **kw)
        mine = fingerprint(fm, encoded[s.client_id], **kw, represent=store.represent)
        # Chunked and batched apart from the client's own pass: equal up to float32 rounding.
        np.testing.assert_allclose(mine["representation"], own["representation"], rtol=1e-5, atol=1e-6)
        for key in ("representation_noise", "representation_dims"):
            assert abs(mine[key] - own[key]) <= 1e-5 * abs(own[key]), (key, mine[key], own[key])
        assert mine["representation_count"] == own["representation_count"]
        np.testing.assert_array_equal(mine["label_counts"], own["label_counts"])  # the per-label upload too
        np.testing.assert_allclose(mine["label_means"], own["label_means"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mine["gradient"], own["gradient"])
        assert mine["importance"] == own["importance"]

    again = bench.RepresentationStore(tmp_path / "store")
    read = [e for s in shards for e in encoded[s.client_id][:cfg.representation_samples]]
    assert again.rows.keys() == store.rows.keys() == {store.key(e) for e in read}
    assert again.fill(fm, read, batch_size=32) == 0
