#!/usr/bin/env python
"""Phase 1 alone, over many seeds: does fingerprint clustering recover the tasks, and with what margin?

    python benchmarks/clustering.py minilm --tasks offline --seeds 0-49
    python benchmarks/clustering.py minilm --tasks offline --seeds 0-49 --max-samples 80
    python benchmarks/clustering.py tiny-bert tiny-gpt2 tiny-qwen2 tiny-llama --tasks generated --seeds 0-49
    python benchmarks/clustering.py distilbert gpt2 --init random --tasks offline --seeds 0-4
    python benchmarks/clustering.py qwen2.5 --init random --weights-seed 0 --seeds 0-49 --fingerprint-samples 1 \
        --reuse-representations ~/.cache/atlas-representations
    python benchmarks/clustering.py minilm --tasks sst2 mrpc cola qnli --data-dir bench-data/glue-shaped --seeds 0-49
    python benchmarks/clustering.py minilm --tasks offline --seeds 0 --versus old/src/atlasfl/federation/fingerprint.py

For every model and seed it does what a run does before round 1 (`federation.driver.plan_or_restore` in-process):
the run's shards, backbone and encodings, `federation.fingerprint.fingerprint` on every client, `Server.plan`.
It prints one line per seed (k, ARI against the true tasks, the margin of the choice in the rule's own units, the
ambiguous flag, the spread-to-noise ratios that decided it, the split test G_k against its bar g_k, the gradient
fingerprint's k and ARI, seconds of fingerprinting per client) and a summary per model (with the runs flagged and
those wrong and not flagged). Nothing is trained; figures are printed, never asserted.
`--weights-seed N` holds one random draw for every data seed, as pretrained weights are held, and
`--reuse-representations DIR` then computes each example's representation once and stores it, so fifty seeds
cost about five seeds' forward passes (offline tasks at preset sizes) and a stopped job resumes where it stopped.
`--second-look auto|on` also runs each seed's federation for one round in-process (`atlas run` with
`--rounds 1 --second-look ...`, test sets cut to 8 examples) and adds the refined partition's ARI (column
*look ARI*: phase 1's where no look was taken), its extra upload and the server's seconds for it (*look s*); the
summary counts the seeds looked at, those whose partition from round 2 on is the tasks (look ARI = 1) and those
where it is not (*wrong after*), with the median of the looks' seconds. Its
fingerprints are computed a second time, by the run.
`--versus FILE` times another version's `federation/fingerprint.py` (`federation/client.py` before it was
split; e.g. from `git archive`) against this one side by side instead: same clients (one per task), calls
interleaved, median seconds per client.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from atlasfl.config import build_config
from atlasfl.data.batching import encode
from atlasfl.data.partition import make_shards
from atlasfl.data.tasks import expand_tasks, load_task
from atlasfl.federation import fingerprint as fp
from atlasfl.federation.records import partition_settings
from atlasfl.federation.server import ClientInfo, Server
from atlasfl.methods import method_for
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.registry import TINY_CONFIGS, load_backbone, resolve_device


def seed_list(text: str) -> list[int]:
    """'0-49' or '1,4,7' or '0-3,9'."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run_setup(model: str, seed: int, a):
    """The run's configuration, its tasks and its shards, as `atlas run` builds them from these flags."""
    cfg = build_config(model, seed, a.method, tasks=tuple(a.tasks), init=a.init, max_samples=a.max_samples,
                       clients_per_task=a.clients_per_task, fingerprint_samples=a.fingerprint_samples,
                       fingerprint=a.fingerprint, batch_size=a.batch_size, device=a.device, data_dir=a.data_dir,
                       representation_samples=a.representation_samples, dirichlet_alpha=a.dirichlet_alpha,
                       val_fraction=a.val_fraction)
    tasks = {n: load_task(n, data_dir=cfg.data_dir) for n in expand_tasks(cfg.tasks)}
    shards = make_shards(list(tasks.values()), cfg.clients_per_task, **partition_settings(cfg))
    return cfg, tasks, shards


def phase1(model: str, seed: int, a, cache: dict) -> dict:
    cfg, tasks, shards = run_setup(model, seed, a)
    # Pretrained weights do not depend on the seed: load them once. Random ones are drawn from the seed, or from
    # --weights-seed, held for every data seed as pretrained weights are.
    random_weights = cfg.init == "random" or model in TINY_CONFIGS
    weights_seed = seed if a.weights_seed is None else a.weights_seed
    key = (model, weights_seed if random_weights else None)
    if key not in cache:
        cache.clear()
        cache[key] = load_backbone(cfg.model, init=cfg.init, seed=weights_seed, device=resolve_device(a.device))
        if a.reuse_representations:
            weights = f"w{weights_seed}" if random_weights else "pretrained"
            cache["store"] = RepresentationStore(Path(a.reuse_representations) / f"{model}-{cfg.init}-{weights}")
    backbone = cache[key]
    # A run encodes whole shards; the fingerprint reads only the first examples, so encoding those is the same work.
    needed = max(cfg.representation_samples, cfg.fingerprint_samples)
    train_enc = {s.client_id: encode(backbone.tokenizer, s.train[:needed], cfg.max_length) for s in shards}
    fm = FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    clients = [ClientInfo(s.client_id, s.task, len(s.train), tasks[s.task].num_labels) for s in shards]
    server = Server(cfg, method_for(cfg), clients, modules=fm.modules, shapes=fm.module_shapes(), facts=fm.facts())
    t0 = time.perf_counter()
    represent = cache["store"].represent if a.reuse_representations else fp.representation_pass
    uploads = {s.client_id: fp.fingerprint(fm, train_enc[s.client_id], num_labels=tasks[s.task].num_labels,
                                               samples=cfg.fingerprint_samples, batch_size=cfg.batch_size,
                                               layers=cfg.fingerprint_layers, dim=cfg.fingerprint_dim, seed=cfg.seed,
                                               representation_samples=cfg.representation_samples, represent=represent)
               for s in shards}
    seconds = (time.perf_counter() - t0) / len(shards)
    plan = server.plan(uploads)
    p = plan.phase1
    k = p["k"]
    t, c = p.get("tightness_by_k") or {}, p.get("threshold_by_k") or {}
    return dict(seed=seed, k=k, ari=p["ari"], margin=p.get("margin"), t_k=t.get(str(k)), t_prev=t.get(str(k - 1)),
                c_k=c.get(str(k)), c_prev=c.get(str(k - 1)), ambiguous=p.get("ambiguous"),
                split=(p.get("split") or {}).get("statistic"), split_bar=(p.get("split") or {}).get("threshold"),
                dims=statistics.median(u["representation_dims"] for u in uploads.values()),
                grad_k=p["k_by_fingerprint"]["gradient"], grad_ari=p["ari_by_fingerprint"]["gradient"],
                s_per_client=seconds, bytes=plan.fingerprint_bytes[0],
                train=sorted({len(s.train) for s in shards}), fingerprint_samples=cfg.fingerprint_samples)


def look(model: str, seed: int, a) -> dict:
    """The seed's run for one round with the second look (`--second-look`): its refined partition's ARI (phase 1's
    where it took none), the bytes it added and its server seconds."""
    import tempfile

    from atlasfl.engines.inprocess import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(model, seed, a.method, tasks=tuple(a.tasks), init=a.init, max_samples=a.max_samples,
                           clients_per_task=a.clients_per_task, fingerprint_samples=a.fingerprint_samples,
                           fingerprint=a.fingerprint, batch_size=a.batch_size, device=a.device, data_dir=a.data_dir,
                           representation_samples=a.representation_samples, dirichlet_alpha=a.dirichlet_alpha,
                           val_fraction=a.val_fraction, rounds=1, max_test_samples=8, second_look=a.second_look,
                           output_dir=tmp, log_dir=tmp, checkpoint_dir=tmp)
        result = run_experiment(cfg, progress=False)
    sl = result["second_look"]
    return dict(look_ari=result["phase1_clustering"]["ari"] if sl is None else sl["ari"], looked=sl is not None,
                look_bytes=0 if sl is None else sl["extra_bytes_up"], look_s=0.0 if sl is None else sl["server_s"])


class RepresentationStore:
    """Each example's pooled representation under one set of weights, computed once and reused by every seed that
    reads it (`--reuse-representations DIR`). Kept in DIR as chunk files, each written whole (temporary file, then
    rename) as soon as it is computed, so a long job that stops keeps what it finished and a later call resumes.
    Keyed by the example's token ids; the folder names the weights."""

    CHUNK = 256

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows = {}
        for f in sorted(folder.glob("chunk-*.pt")):
            chunk = torch.load(f)
            self.rows.update(zip(chunk["keys"], chunk["rows"]))

    @staticmethod
    def key(example: dict) -> str:
        return hashlib.blake2b(str(list(example["input_ids"])).encode(), digest_size=16).hexdigest()

    def fill(self, fm, examples: list[dict], batch_size: int) -> int:
        """Compute the examples not stored yet, in length order, a chunk at a time; returns how many were new."""
        new = {self.key(e): e for e in examples}
        todo = sorted(((k, e) for k, e in new.items() if k not in self.rows),
                      key=lambda item: len(item[1]["input_ids"]))
        for start in range(0, len(todo), self.CHUNK):
            keys, chunk = zip(*todo[start:start + self.CHUNK])
            # representation_pass returns rows in length order (a stable sort); `chunk` is in that order already.
            rows, _ = fp.representation_pass(fm, list(chunk), batch_size=batch_size, max_examples=len(chunk))
            name = self.folder / f"chunk-{keys[0]}.pt"  # a chunk's first key names it: no counter to keep
            torch.save({"keys": list(keys), "rows": rows}, name.with_suffix(".tmp"))
            os.replace(name.with_suffix(".tmp"), name)
            self.rows.update(zip(keys, rows))
            print(f"  representations: {start + len(chunk)}/{len(todo)} new examples stored", file=sys.stderr,
                  flush=True)
        return len(todo)

    def represent(self, fm, encoded: list[dict], *, batch_size: int, max_examples: int):
        """`fp.representation_pass`, from the store: computes only the examples it has not seen."""
        examples = encoded[:max_examples]
        self.fill(fm, examples, batch_size)
        return (torch.stack([self.rows[self.key(e)] for e in examples]),
                torch.tensor([e["labels"] for e in examples], dtype=torch.long))


def versus(model: str, path: str, a) -> None:
    """Median seconds per client of this fingerprint and of the one in `path`, called alternately."""
    spec = importlib.util.spec_from_file_location("other_client", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    cfg, tasks, shards = run_setup(model, seed_list(a.seeds)[0], a)
    backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=resolve_device(a.device))
    fm = FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    times = {"this": [], "other": []}
    for s in shards[::cfg.clients_per_task]:
        enc = encode(backbone.tokenizer, s.train[:max(cfg.representation_samples, cfg.fingerprint_samples)],
                     cfg.max_length)
        kw = dict(num_labels=tasks[s.task].num_labels, samples=cfg.fingerprint_samples, batch_size=cfg.batch_size,
                  layers=cfg.fingerprint_layers, dim=cfg.fingerprint_dim, seed=cfg.seed)
        this = dict(representation_samples=cfg.representation_samples)
        for name, fn, extra in [("other", other.fingerprint, {}), ("this", fp.fingerprint, this)] * 2:
            t0 = time.perf_counter()
            fn(fm, enc, **kw, **extra)
            times[name].append(time.perf_counter() - t0)
    mine, theirs = statistics.median(times["this"]), statistics.median(times["other"])
    print(f"{model}: {len(shards[0].train)} training examples/client, {cfg.fingerprint_samples} gradient samples: "
          f"{path} {theirs:.2f} s/client, this {mine:.2f} s/client, ratio {mine / theirs:.2f}")


def flag(row: dict) -> str:
    """'yes' when phase 1 flagged the partition ambiguous, 'no' when its split test ran and did not, '-' otherwise."""
    return "-" if row["ambiguous"] is None else "yes" if row["ambiguous"] else "no"


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--seeds", default="0-49", help="e.g. 0-49 or 1,4,7")
    p.add_argument("--tasks", nargs="+", default=["offline"])
    p.add_argument("--data-dir", help="local GLUE folder, as `atlas run --data-dir`")
    p.add_argument("--init", default="pretrained", choices=("pretrained", "random"))
    p.add_argument("--max-samples", type=int, help="per client (train + local validation); default: the preset's")
    p.add_argument("--clients-per-task", type=int)
    p.add_argument("--dirichlet-alpha", type=float, help="label-skewed shards (default: IID within task)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="local validation share (default 0.1)")
    p.add_argument("--fingerprint-samples", type=int, help="gradient pass; default: the preset's")
    p.add_argument("--representation-samples", type=int, default=512, help="representation pass (default 512)")
    p.add_argument("--fingerprint", default="representation", choices=("representation", "gradient"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weights-seed", type=int,
                   help="random weights: draw them once from this seed and keep them for every data seed, as "
                        "pretrained weights are (default: drawn from each seed, as a run does)")
    p.add_argument("--reuse-representations", metavar="DIR",
                   help="compute each example's representation once per set of weights, keep it in DIR and reuse it "
                        "across seeds and calls (many seeds at the cost of a few; s/client then counts new "
                        "examples only)")
    p.add_argument("--method", default="atlas")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--versus", metavar="FILE", help="time another version's federation/fingerprint.py side by side")
    p.add_argument("--second-look", choices=("auto", "on"),
                   help="also run one round with the second look and report the refined partition's ARI")
    return p.parse_args(argv)


def main() -> None:
    a = arguments()
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.versus:
        for model in a.models:
            versus(model, a.versus, a)
        return
    print(f"{'model':<12} {'seed':>4} {'k':>2} {'ARI':>6} {'margin':>7} {'amb':>3} {'T_k':>6} {'c_k':>5} {'T_k-1':>7} "
          f"{'c_k-1':>5} {'G_k':>5} {'g_k':>5} {'dims':>5} {'grad k':>6} {'grad ARI':>8} {'s/client':>8}"
          + (f" {'look ARI':>8} {'look B':>7} {'look s':>6}" if a.second_look else ""), flush=True)
    summary = []
    for model in a.models:
        cache, rows = {}, []
        for seed in seed_list(a.seeds):
            r = phase1(model, seed, a, cache)
            if a.second_look:
                r.update(look(model, seed, a))
            rows.append(r)
            print(f"{model:<12} {seed:>4} {r['k']:>2} {r['ari']:>6.3f} {fmt(r['margin']):>7} {flag(r):>3} "
                  f"{fmt(r['t_k'], '.2f'):>6} {fmt(r['c_k'], '.2f'):>5} {fmt(r['t_prev'], '.2f'):>7} "
                  f"{fmt(r['c_prev'], '.2f'):>5} {fmt(r['split'], '.2f'):>5} {fmt(r['split_bar'], '.2f'):>5} "
                  f"{r['dims']:>5.1f} {r['grad_k']:>6} {r['grad_ari']:>8.3f} {r['s_per_client']:>8.2f}"
                  + (f" {r['look_ari']:>8.3f} {r['look_bytes']:>7} {r['look_s']:>6.2f}" if a.second_look else ""),
                  flush=True)
        margins = [r["margin"] for r in rows if r["margin"] is not None]
        summary.append((model, rows, margins))
    print(f"\n{'model':<12} {'seeds':>5} {'ARI=1':>5} {'flagged':>7} {'wrong+unflagged':>15} {'worst margin':>12} "
          f"{'median margin':>13} {'grad ARI=1':>10} "
          f"{'grad ARI med':>12} {'s/client':>8} {'bytes':>6}"
          + (f" {'looked':>6} {'look ARI=1':>10} {'wrong after':>11} {'look s med':>10}" if a.second_look else "")
          + "  train examples/client, gradient samples")
    for model, rows, margins in summary:
        print(f"{model:<12} {len(rows):>5} {sum(r['ari'] == 1.0 for r in rows):>5} "
              f"{sum(bool(r['ambiguous']) for r in rows):>7} "
              f"{sum(r['ari'] < 1.0 and not r['ambiguous'] for r in rows):>15} "
              f"{fmt(min(margins) if margins else None):>12} "
              f"{fmt(median_or_none(margins)):>13} "
              f"{sum(r['grad_ari'] == 1.0 for r in rows):>10} {statistics.median(r['grad_ari'] for r in rows):>12.3f} "
              f"{statistics.mean(r['s_per_client'] for r in rows):>8.2f} {rows[0]['bytes']:>6}"
              + (f" {sum(r['looked'] for r in rows):>6} {sum(r['look_ari'] == 1.0 for r in rows):>10} "
                 f"{sum(r['look_ari'] < 1.0 for r in rows):>11} "
                 f"{fmt(median_or_none([r['look_s'] for r in rows if r['looked']]), '.2f'):>10}"
                 if a.second_look else "")
              + f"  {rows[0]['train']}, {rows[0]['fingerprint_samples']}")


if __name__ == "__main__":
    main()
