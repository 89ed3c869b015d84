"""Local training of the clients' adapters and heads on the shared model: one client at a time
(`train_local`) or every client of a round in shared passes (`train_clients`), and a round's training as the
client's method lays it out in phases (`train_client`, `train_cohort`).

Both engines call these functions; they only need the model, the client id and encoded examples.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import Tally, batches
from atlasfl.methods.base import PARTS, Method
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.personal import personal_id


def client_seed(seed: int, round_idx: int, cid: int) -> int:
    """Per (run, round, client) seed: batch order and dropout do not depend on what ran before."""
    return (seed * 1_000_003 + round_idx * 10_007 + cid) % (2**31)


ExtraLoss = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]


def train_local(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, epochs: int, lr: float,
                batch_size: int, seed: int, max_grad_norm: float = 1.0, group_by_length: bool = False,
                tally: Tally | None = None, parts: Sequence[str] = PARTS, extra_loss: ExtraLoss | None = None,
                anchor: Sequence[torch.Tensor] | None = None) -> float:
    """`epochs` passes of AdamW over the `parts` of the client's state (its method's `trains`) on its shard;
    returns the mean training cross-entropy. The batches (see `batching.batch_order`) are counted into `tally`.
    `extra_loss(params, their values at the start)` (the method's `extra_loss`) is added to each batch's loss;
    `anchor`, if given, stands for those start values (a personal copy is pulled toward the shared state).

    The optimizer is created afresh each round: after aggregation the old moments describe weights
    the client no longer holds, and a fresh optimizer keeps resume exact without saving them.
    """
    torch.manual_seed(seed)
    fm.activate(cid, train=True)
    params = fm.trainable_parameters(cid, parts)
    start = None if extra_loss is None else anchor if anchor is not None else [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    with frozen_outside(fm, [cid], parts):
        for batch in local_batches(fm, encoded, epochs=epochs, batch_size=batch_size, seed=seed,
                                   group_by_length=group_by_length, tally=tally):
            loss = cross_entropy(fm.logits(cid, batch), batch["labels"].to(fm.device))
            optimizer.zero_grad(set_to_none=True)
            (loss if start is None else loss + extra_loss(params, start)).backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


@contextmanager
def frozen_outside(fm: FederatedLoRAModel, cids: Sequence[int], parts: Sequence[str]) -> Iterator[None]:
    """The clients' parameters outside `parts` take no gradient (none is computed for them) until the block ends:
    a phase that trains the head alone costs no backward pass through the base."""
    rest = [p for cid in cids for p in fm.trainable_parameters(cid, [q for q in PARTS if q not in parts])]
    for p in rest:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in rest:
            p.requires_grad_(True)


def phase_plan(method: Method) -> list[tuple[Sequence[str], int, int]]:
    """The method's `local_phases` with each one's first epoch (a phase continues its predecessor's batch stream:
    epoch e of the round is shuffled with seed + e whichever phase runs it); phases of no epochs are dropped."""
    plan, first = [], 0
    for parts, epochs in method.local_phases():
        if epochs > 0:
            plan.append((parts, epochs, first))
            first += epochs
    return plan


def round_loss(losses: Sequence[float], epochs: Sequence[int]) -> float:
    """The mean training loss of a round from its phases' means (every epoch holds the same batches)."""
    if len(losses) == 1:
        return losses[0]
    return float(np.average(losses, weights=epochs)) if losses else float("nan")


def train_client(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, method: Method, seed: int, lr: float,
                 batch_size: int, group_by_length: bool = False, tally: Tally | None = None) -> float:
    """One client's round of local training as its method lays it out: `train_local` for each of its phases in
    turn, with the method's extra loss; then, if the method keeps a personal copy, the same phases on the same
    batches for the copy, with the method's personal loss anchored at the shared state the round started from.
    The round's mean training loss (the personal copy's where there is one: it is what the client is scored by)."""
    kw = dict(lr=lr, batch_size=batch_size, group_by_length=group_by_length, tally=tally)
    plan = phase_plan(method)
    anchors = _anchors(fm, [cid], plan) if method.keeps_personal else None
    losses = [train_local(fm, cid, encoded, epochs=epochs, parts=parts, seed=seed + first,
                          extra_loss=method.extra_loss(), **kw) for parts, epochs, first in plan]
    if anchors is not None:
        losses = [train_local(fm, personal_id(cid), encoded, epochs=epochs, parts=parts, seed=seed + first,
                              extra_loss=method.personal_loss(), anchor=anchors[cid][i], **kw)
                  for i, (parts, epochs, first) in enumerate(plan)]
    return round_loss(losses, [epochs for _, epochs, _ in plan])


def _anchors(fm: FederatedLoRAModel, cids: Sequence[int], plan) -> dict[int, list[list[torch.Tensor]]]:
    """Each client's shared parameters of each phase's parts, as they stand now (the round's start)."""
    return {cid: [[p.detach().clone() for p in fm.trainable_parameters(cid, parts)] for parts, _, _ in plan]
            for cid in cids}


def local_batches(fm: FederatedLoRAModel, encoded: list[dict], *, epochs: int, batch_size: int, seed: int,
                  group_by_length: bool, tally: Tally | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """A client's training batches of one round, every epoch after the other (epoch e shuffled with seed + e)."""
    for epoch in range(epochs):
        yield from batches(encoded, batch_size, shuffle=True, seed=seed + epoch, group_by_length=group_by_length,
                           pad_token_id=fm.backbone.tokenizer.pad_token_id, tally=tally)


@dataclass(frozen=True)
class TrainJob:
    """One client's share of a round's training: its id, its encoded shard and its seed (`client_seed`)."""

    cid: int
    encoded: list[dict]
    seed: int
    anchor: list[torch.Tensor] | None = None  # what `extra_loss` measures from instead of the start (`train_local`)


def train_clients(fm: FederatedLoRAModel, jobs: Sequence[TrainJob], *, epochs: int, lr: float, batch_size: int,
                  max_rows: int | None = None, max_grad_norm: float = 1.0, group_by_length: bool = False,
                  tally: Tally | None = None, parts: Sequence[str] = PARTS, extra_loss: ExtraLoss | None = None
                  ) -> dict[int, float]:
    """`train_local` for every job at once: each client gets the batches, AdamW, clipping and mean loss that
    `train_local` would give it, but step t of all clients runs as one forward and backward pass through the
    frozen base (`FederatedLoRAModel.routed_logits`). Returns each client's mean training loss.

    The summed loss of a pass is the sum of each client's mean batch loss; clients own disjoint parameters, so
    each one's gradient is its own loss's, and it is clipped and stepped alone. Clients whose batches of a step
    hold more than `max_rows` rows in all are split over several passes, in order of batch width, so each pass
    pads little. Results equal the sequential path's up to float rounding, except for dropout: its masks come
    from one stream, seeded with the first job's seed (`tally` counts the rows and padding of the passes run).
    """
    if not jobs:
        return {}
    torch.manual_seed(jobs[0].seed)
    device, pad = fm.device, fm.backbone.tokenizer.pad_token_id
    params = {job.cid: fm.trainable_parameters(job.cid, parts) for job in jobs}
    starts = None if extra_loss is None else {job.cid: job.anchor if job.anchor is not None else
                                              [p.detach().clone() for p in params[job.cid]] for job in jobs}
    optimizers = {cid: torch.optim.AdamW(p, lr=lr, weight_decay=0.0) for cid, p in params.items()}
    streams = {job.cid: local_batches(fm, job.encoded, epochs=epochs, batch_size=batch_size, seed=job.seed,
                                      group_by_length=group_by_length) for job in jobs}
    losses: dict[int, list[float]] = {cid: [] for cid in streams}
    with fm.training_together(list(streams)), frozen_outside(fm, list(streams), parts):
        while True:
            step = {cid: b for cid, b in ((cid, next(s, None)) for cid, s in streams.items()) if b is not None}
            if not step:
                break
            for chunk in _passes(step, max_rows):
                combined, spans = _concatenate([step[cid] for cid in chunk], chunk, pad)
                if tally is not None:
                    tally.add(combined)
                logits = fm.routed_logits(spans, combined)
                labels = combined["labels"].to(device)
                step_losses = torch.stack([cross_entropy(lg, labels[start:stop])
                                           for lg, (_, start, stop) in zip(logits, spans)])
                for cid in chunk:
                    optimizers[cid].zero_grad(set_to_none=True)
                objective = step_losses.sum()
                if starts is not None:
                    objective = objective + sum(extra_loss(params[cid], starts[cid]) for cid in chunk)
                objective.backward()
                for cid in chunk:
                    torch.nn.utils.clip_grad_norm_(params[cid], max_grad_norm)
                    optimizers[cid].step()
                for cid, value in zip(chunk, step_losses.detach().cpu().tolist()):
                    losses[cid].append(value)
    return {cid: float(np.mean(v)) if v else float("nan") for cid, v in losses.items()}


def train_cohort(fm: FederatedLoRAModel, jobs: Sequence[TrainJob], *, method: Method, lr: float, batch_size: int,
                 max_rows: int | None = None, group_by_length: bool = False, tally: Tally | None = None
                 ) -> dict[int, float]:
    """`train_client` for every job at once: each phase of the method is one `train_clients` over all jobs (and
    over all personal copies after them)."""
    kw = dict(lr=lr, batch_size=batch_size, max_rows=max_rows, group_by_length=group_by_length, tally=tally)
    plan = phase_plan(method)
    anchors = _anchors(fm, [job.cid for job in jobs], plan) if method.keeps_personal else None
    phases = [train_clients(fm, [replace(job, seed=job.seed + first) for job in jobs], epochs=epochs, parts=parts,
                            extra_loss=method.extra_loss(), **kw) for parts, epochs, first in plan]
    if anchors is not None:
        phases = [{personal_id(copy): loss for copy, loss in train_clients(  # personal_id is its own inverse
            fm, [TrainJob(personal_id(job.cid), job.encoded, job.seed + first, anchors[job.cid][i]) for job in jobs],
            epochs=epochs, parts=parts, extra_loss=method.personal_loss(), **kw).items()}
            for i, (parts, epochs, first) in enumerate(plan)]
    return {job.cid: round_loss([p[job.cid] for p in phases], [e for _, e, _ in plan]) for job in jobs}


def _passes(step: dict[int, dict], max_rows: int | None) -> list[list[int]]:
    """The clients of one step, cut into forward passes of at most `max_rows` rows (one client's batch always
    fits one pass), widest batches first so each pass pads its rows to similar widths."""
    order = sorted(step, key=lambda cid: -step[cid]["input_ids"].shape[1])
    chunks, rows = [[]], 0
    for cid in order:
        n = len(step[cid]["input_ids"])
        if chunks[-1] and max_rows is not None and rows + n > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(cid)
        rows += n
    return chunks


def _concatenate(parts: list[dict], cids: list[int], pad_token_id: int) -> tuple[dict, list[tuple[int, int, int]]]:
    """Right-padded batches stacked into one, padded on the right to the widest; with each client's row span."""
    width = max(b["input_ids"].shape[1] for b in parts)
    spans, start = [], 0
    for cid, b in zip(cids, parts):
        spans.append((cid, start, start + len(b["input_ids"])))
        start += len(b["input_ids"])

    def widen(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([widen(b["input_ids"], pad_token_id) for b in parts]),
            "attention_mask": torch.cat([widen(b["attention_mask"], 0) for b in parts]),
            "labels": torch.cat([b["labels"] for b in parts])}, spans
