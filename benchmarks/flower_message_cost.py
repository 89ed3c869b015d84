#!/usr/bin/env python
"""What a deployed Flower message costs before any work: Flower 1.42's SuperNode starts one `flwr-clientapp`
process per message, and that process imports the ClientApp and rebuilds the model and the client's data.

    python benchmarks/flower_message_cost.py            # the loopback deployment test's configuration
    python benchmarks/flower_message_cost.py minilm --tasks offline

Run it as its own process (it times the imports of a fresh interpreter). Prints one line of seconds per step.
"""
import argparse
import time

start = time.perf_counter()
import torch  # noqa: E402,F401

after_torch = time.perf_counter()
import flwr.app  # noqa: E402,F401

after_flwr = time.perf_counter()
from atlasfl.engines.flower import client_app  # noqa: E402,F401  (peft, transformers and ATLAS's client side)

after_app = time.perf_counter()

from atlasfl.config import build_config  # noqa: E402
from atlasfl.data.batching import encode  # noqa: E402
from atlasfl.federation.records import load_client_data  # noqa: E402
from atlasfl.models.lora import FederatedLoRAModel  # noqa: E402
from atlasfl.models.registry import load_backbone  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="tiny-bert")
    p.add_argument("--tasks", nargs="+", default=["gen_sentiment", "gen_pair"])
    p.add_argument("--client", type=int, default=0)
    a = p.parse_args()
    cfg = build_config(a.model, 0, "atlas", mode="quick", tasks=tuple(a.tasks), clients_per_task=2, max_samples=24,
                       max_test_samples=16, batch_size=8, fingerprint_samples=8)
    t0 = time.perf_counter()
    backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device="cpu")
    FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    t1 = time.perf_counter()
    shard, task = load_client_data(cfg, a.client)
    for rows in (shard.train, shard.val, task.test):
        encode(backbone.tokenizer, rows, cfg.max_length)
    t2 = time.perf_counter()
    print(f"{a.model}: import torch {after_torch - start:.2f} s | import flwr.app {after_flwr - after_torch:.2f} s | "
          f"import the ClientApp (peft, transformers, atlasfl) {after_app - after_flwr:.2f} s | "
          f"model {t1 - t0:.2f} s | data and encodings {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
