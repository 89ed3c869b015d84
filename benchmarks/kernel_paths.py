#!/usr/bin/env python
"""Do other kernel paths pay on this CPU? One client's LoRA training steps on the identical-work workload
(MiniLM, batch 16, its real batches with dynamic padding), eager against `torch.compile` (inductor, dynamic
shapes) and, with --bf16, against bf16 autocast, in one process, alternating passes over the same batches so load drift
hits every path alike. Prints the compile time and the median seconds per step of each path.

    python benchmarks/kernel_paths.py --data-dir bench-data/glue-shaped --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from torch.nn.functional import cross_entropy

from atlasfl.bench import IDENTICAL, PlainLoop, pooled_logits
from atlasfl.config import build_config
from atlasfl.data.batching import batches
from atlasfl.engines.inprocess import set_up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--passes", type=int, default=3, help="passes over the client's batches per path")
    p.add_argument("--bf16", action="store_true",
                   help="also bf16 autocast (slow where the CPU has no bf16 instructions: 22x here)")
    a = p.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fed = set_up(build_config("minilm", 42, "local_only", data_dir=a.data_dir, output_dir=tmp, log_dir=tmp,
                                  checkpoint_dir=tmp, device="cpu", lora_dropout=0.0, **IDENTICAL))
    client = fed.shards[0]
    steps = list(batches(fed.train_enc[client.client_id], 16, shuffle=True, seed=0,
                         pad_token_id=fed.fm.backbone.tokenizer.pad_token_id))
    torch.manual_seed(0)
    model = PlainLoop(fed).model  # the plain loop's base with one PEFT LoRA (r=8, dropout 0 as set above)
    head = torch.nn.Linear(model.config.hidden_size, fed.tasks[client.task].num_labels)
    params = [q for q in model.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5)

    def step(net, batch, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = cross_entropy(pooled_logits(net, head, batch, "cpu").float(), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    compiled = torch.compile(model, dynamic=True)
    t0 = time.perf_counter()
    for batch in steps:  # every width once: the compile and any recompiles are paid here
        step(compiled, batch, False)
    compile_s = time.perf_counter() - t0
    paths = {"eager": (model, False), "torch.compile": (compiled, False)}
    if a.bf16:
        paths["eager, bf16 autocast"] = (model, True)
    seconds = {name: [] for name in paths}
    for i in range(a.passes):
        for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
            net, autocast = paths[name]
            for batch in steps:
                t = time.perf_counter()
                step(net, batch, autocast)
                seconds[name].append(time.perf_counter() - t)
    print(f"MiniLM + LoRA r=8, one client, {len(steps)} batches of 16, {a.passes} passes per path, "
          f"torch threads {torch.get_num_threads()}; first compiled pass (compile included): {compile_s:.1f} s")
    eager = statistics.median(seconds["eager"])
    for name, s in seconds.items():
        median = statistics.median(s)
        print(f"{name:22} median {1000 * median:7.1f} ms/step   eager/this {eager / median:.2f}x")


if __name__ == "__main__":
    main()
