"""Speed figures of a workload: ATLAS's round (`federation.driver.run_round`) beside a plain sequential
PyTorch loop run in the same process on the same batches, alternately, so the ratio holds on a loaded
machine where absolute seconds do not. `atlas bench` prints them; nothing here is asserted in tests."""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a workload runs, so `atlas --help` does not load it
    import torch

# The shared identical-work benchmark (../shared/bench/README.md): MiniLM, 12 clients of 200 training
# examples, 1 local epoch, batch 16, 200 test rows per task. `random` runs the same shape at full size.
IDENTICAL = dict(tasks=("sst2", "mrpc", "cola", "qnli"), rounds=2, local_epochs=1, batch_size=16, lr=2e-5,
                 max_samples=222, max_test_samples=200, fingerprint_samples=20)
# A client-batched pass of 96 rows (6 clients' batches): MiniLM's pass of 192 rows already peaked at 8.4 GB.
SCALING = dict(clients=(3, 12, 24), models=("tiny-bert", "minilm", "distilbert"), max_samples=44,
               client_batch_rows=96)


def scaling_settings(model: str, clients_per_task: int) -> dict:
    """One step of the scaling sweep: the identical workload's shape, smaller shards, one round; every model but
    the packaged MiniLM at full size with random weights."""
    return dict(clients_per_task=clients_per_task, max_samples=SCALING["max_samples"], rounds=1,
                init="pretrained" if model == "minilm" else "random")


def pooled_logits(model, head, batch: dict, device) -> torch.Tensor:
    """The head over the mean of the last hidden states of the real (non-padding) tokens."""
    mask = batch["attention_mask"].to(device)
    hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return head((hidden * m).sum(1) / m.sum(1))


def bench_rows(model: str, settings: dict) -> list[list[str]]:
    """The plain loop and ATLAS's round, sequential and client-batched (and, with group_by_length, both again with
    length-grouped batches), each from the same states, alternately for `rounds` rounds on one shared set-up,
    the order flipped every round. `client_batch_rows` caps the client-batched passes."""
    from atlasfl.config import build_config
    from atlasfl.engines.inprocess import set_up
    from atlasfl.federation.driver import RunProgress, plan_or_restore, run_round
    from atlasfl.methods import method_for

    rounds, grouped = settings.pop("rounds"), settings.pop("group_by_length")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(model, 42, "atlas", output_dir=tmp, log_dir=tmp, checkpoint_dir=tmp, rounds=rounds,
                           **settings)
        transport = set_up(cfg)
        fed = plan_or_restore(cfg, method_for(cfg), transport, None)
        plain = PlainLoop(transport)
        variants = {}
        # One round more than measured: no measured round is the last, whose local validation is not round work.
        for label, group in (("atlas, ungrouped", False), ("atlas, grouped", True))[:1 + grouped]:
            variants[label] = cfg.model_copy(update=dict(group_by_length=group, rounds=rounds + 1))
            variants[f"{label} + client batching"] = cfg.model_copy(update=dict(group_by_length=group,
                                                                                client_batching=True,
                                                                                rounds=rounds + 1))

        def ours(name, r):
            fed.cfg = transport.cfg = variants[name]
            transport.start_eta(cfg.eta, start)
            with RunProgress(False) as bars:
                return run_round(fed, r, bars)["cost"]

        clocks = {"plain loop": [], **{name: [] for name in variants}}
        for r in range(1, rounds + 1):
            start = transport.states()
            order = ["plain loop", *variants]
            for name in order if r % 2 else order[::-1]:
                clocks[name].append(plain.round(r) if name == "plain loop" else ours(name, r))
    return table_rows(model, len(transport.shards), clocks)


def method_rows(model: str, settings: dict, methods: list[str]) -> list[list[str]]:
    """Each method's own federation on the same clients and batches (its own plan: ranks differ by method), one
    round of each in turn, the order flipped every round; per method its mean round costs, the mean bytes per
    client per round each way, and its total seconds over the first method's (above 1: slower)."""
    from atlasfl.config import build_config
    from atlasfl.engines.inprocess import set_up
    from atlasfl.federation.driver import RunProgress, plan_or_restore, run_round
    from atlasfl.methods import method_for

    rounds = settings.pop("rounds")
    settings.pop("group_by_length", None)
    with tempfile.TemporaryDirectory() as tmp:
        feds = {}
        for name in methods:  # one round more than measured: the last one's local validation is not round work
            cfg = build_config(model, 42, name, output_dir=tmp, log_dir=tmp, checkpoint_dir=f"{tmp}/{name}",
                               rounds=rounds + 1, **settings)
            fed = feds[name] = plan_or_restore(cfg, method_for(cfg), set_up(cfg), None)
            fed.server.eta = fed.method.etas()[0]
            fed.transport.start_eta(fed.server.eta, None)
        entries: dict[str, list[dict]] = {name: [] for name in methods}
        for r in range(1, rounds + 1):
            for name in methods if r % 2 else methods[::-1]:
                with RunProgress(False) as bars:
                    entries[name].append(run_round(feds[name], r, bars))
                feds[name].rounds.append(entries[name][-1])
    clients = len(next(iter(feds.values())).roster.shards)
    mean = {name: _mean_cost([e["cost"] for e in es]) for name, es in entries.items()}
    first = mean[methods[0]]["total_s"]
    rows = []
    for name, es in entries.items():
        up, down = (sum(e[f"bytes_{way}_total"] for e in es) / (len(es) * clients) for way in ("up", "down"))
        c = mean[name]
        rows.append([model, name, str(clients), f"{c['train_s']:.1f}", f"{c['aggregate_s']:.2f}",
                     f"{c['evaluate_s']:.1f}", f"{c['total_s']:.1f}", f"{up:,.0f}", f"{down:,.0f}",
                     f"{c['total_s'] / first:.2f}x"])
    return rows


def table_rows(model: str, clients: int, clocks: dict[str, list[dict]]) -> list[list[str]]:
    """One row per loop of its round costs averaged over the rounds; the last cell is the plain loop's total
    seconds over the row's (above 1: faster than the plain loop)."""
    mean = {k: _mean_cost(v) for k, v in clocks.items()}
    return [[model, str(clients), name, *_cells(c), f"{mean['plain loop']['total_s'] / c['total_s']:.2f}x"]
            for name, c in mean.items()]


def _mean_cost(costs: list[dict]) -> dict:
    out = {k: sum(c[k] for c in costs) / len(costs) for k in ("train_s", "aggregate_s", "evaluate_s")}
    out["total_s"] = out["train_s"] + out["aggregate_s"] + out["evaluate_s"]
    for part in ("train", "evaluate"):
        out[part] = {k: sum(c[part][k] for c in costs) / len(costs) for k in costs[0][part]}
    return out


def _cells(c: dict) -> list[str]:
    positions = c["train"]["padded_tokens"] + c["evaluate"]["padded_tokens"]
    real = c["train"]["real_tokens"] + c["evaluate"]["real_tokens"]
    rates = [f"{c[p][k] / c[p + '_s']:.0f}" for p in ("train", "evaluate") for k in ("examples", "real_tokens")]
    return [f"{c['train_s']:.1f}", f"{c['aggregate_s']:.2f}", f"{c['evaluate_s']:.1f}", f"{c['total_s']:.1f}",
            *rates, f"{100 * (1 - real / positions):.0f}"]


class PlainLoop:
    """The floor of doing the same steps sequentially: its own copy of the base with one PEFT LoRA (r=8, the
    same modules), per client a fresh head and AdamW over the client's batches of this round (same seeded
    order, dynamic padding, clipping 1.0), then every client scored on its task's test set under no_grad
    in the given order. No aggregation. Written without ATLAS's model code, as a reference."""

    def __init__(self, fed):
        from peft import LoraConfig, get_peft_model

        from atlasfl.models.registry import load_backbone

        self.fed = fed
        cfg = fed.cfg
        backbone = load_backbone(cfg.model, init=cfg.init, seed=cfg.seed, device=fed.device)
        self.model = get_peft_model(backbone.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=cfg.lora_dropout,
                                                               target_modules=fed.fm.modules))
        self.pad = backbone.tokenizer.pad_token_id

    def round(self, r: int) -> dict:
        import torch
        from torch.nn.functional import cross_entropy

        from atlasfl.data.batching import Tally, batches
        from atlasfl.federation.training import client_seed

        fed, cfg = self.fed, self.fed.cfg
        work, heads, t0 = {"train": Tally(), "evaluate": Tally()}, {}, time.perf_counter()
        self.model.train()
        for s in fed.shards:
            seed = client_seed(cfg.seed, r, s.client_id)
            torch.manual_seed(seed)
            head = heads[s.client_id] = torch.nn.Linear(self.model.config.hidden_size,
                                                        fed.tasks[s.task].num_labels).to(fed.device)
            params = [p for p in self.model.parameters() if p.requires_grad] + list(head.parameters())
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            for epoch in range(cfg.local_epochs):
                for batch in batches(fed.train_enc[s.client_id], cfg.batch_size, shuffle=True, seed=seed + epoch,
                                     pad_token_id=self.pad, tally=work["train"]):
                    logits = pooled_logits(self.model, head, batch, fed.device)
                    loss = cross_entropy(logits, batch["labels"].to(fed.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
        t_train = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            for s in fed.shards:
                for batch in batches(fed.test_enc[s.task], cfg.eval_batch_size, shuffle=False, seed=None,
                                     pad_token_id=self.pad, tally=work["evaluate"]):
                    pooled_logits(self.model, heads[s.client_id], batch, fed.device).argmax(-1)
        t_end = time.perf_counter()
        return dict(train_s=t_train - t0, aggregate_s=0.0, evaluate_s=t_end - t_train,
                    train=asdict(work["train"]), evaluate=asdict(work["evaluate"]))
