"""Client-side work on the shared model: local training and evaluation of one client's adapter and
head, what a state looks like after a trip over the wire, and the phase-1 fingerprint.

Both engines call these functions; they only need the model, the client id and encoded examples.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import Tally, batches
from atlasfl.data.tasks import TaskData
from atlasfl.metrics import classification_metrics, task_score
from atlasfl.models.lora import FederatedLoRAModel, layer_index, masked_mean, transformer_blocks
from atlasfl.phases.sketch import count_sketch, count_sketch_rows

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def client_seed(seed: int, round_idx: int, cid: int) -> int:
    """Per (run, round, client) seed: batch order and dropout do not depend on what ran before."""
    return (seed * 1_000_003 + round_idx * 10_007 + cid) % (2**31)


def train_local(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, epochs: int, lr: float,
                batch_size: int, seed: int, max_grad_norm: float = 1.0, group_by_length: bool = False,
                tally: Tally | None = None) -> float:
    """`epochs` passes of AdamW over the client's shard; returns the mean training loss. The batches
    (see `batching.batch_order`) are counted into `tally`.

    The optimizer is created afresh each round: after aggregation the old moments describe weights
    the client no longer holds, and a fresh optimizer keeps resume exact without saving them.
    """
    torch.manual_seed(seed)
    fm.activate(cid, train=True)
    params = fm.trainable_parameters(cid)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in local_batches(fm, encoded, epochs=epochs, batch_size=batch_size, seed=seed,
                               group_by_length=group_by_length, tally=tally):
        loss = cross_entropy(fm.logits(cid, batch), batch["labels"].to(fm.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


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


def train_clients(fm: FederatedLoRAModel, jobs: Sequence[TrainJob], *, epochs: int, lr: float, batch_size: int,
                  max_rows: int | None = None, max_grad_norm: float = 1.0, group_by_length: bool = False,
                  tally: Tally | None = None) -> dict[int, float]:
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
    params = {job.cid: fm.trainable_parameters(job.cid) for job in jobs}
    optimizers = {cid: torch.optim.AdamW(p, lr=lr, weight_decay=0.0) for cid, p in params.items()}
    streams = {job.cid: local_batches(fm, job.encoded, epochs=epochs, batch_size=batch_size, seed=job.seed,
                                      group_by_length=group_by_length) for job in jobs}
    losses: dict[int, list[float]] = {cid: [] for cid in streams}
    with fm.training_together(list(streams)):
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
                step_losses.sum().backward()
                for cid in chunk:
                    torch.nn.utils.clip_grad_norm_(params[cid], max_grad_norm)
                    optimizers[cid].step()
                for cid, value in zip(chunk, step_losses.detach().cpu().tolist()):
                    losses[cid].append(value)
    return {cid: float(np.mean(v)) if v else float("nan") for cid, v in losses.items()}


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


def wire(state: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state as it arrives after a trip at the wire dtype, and the bytes that trip carried."""
    wd = WIRE_DTYPES[dtype]
    sent = {k: v.to(wd) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in sent.values())
    return {k: v.to(state[k].dtype) for k, v in sent.items()}, nbytes


def evaluate_client(fm: FederatedLoRAModel, cid: int, encoded: list[dict], task: TaskData, batch_size: int,
                    tally: Tally | None = None) -> dict:
    """The client's metrics on `encoded`: GLUE metric of its task (`score`), accuracy, F1s, MCC, loss."""
    return scores(task, predict(fm, cid, encoded, batch_size=batch_size, tally=tally))


def test_scores(task: TaskData, predictions: tuple, personal: Sequence[int]) -> dict:
    """Both protocols from one pass over the task's test set: the global metrics, and under `personal`
    the same metrics on the client's personal rows (`data.partition.personal_test_rows`) with their count."""
    return {**scores(task, predictions), "personal": {**scores(task, predictions, personal), "n": len(personal)}}


def scores(task: TaskData, predictions: tuple, rows: Sequence[int] | None = None) -> dict:
    """Metrics of `predict`'s output (labels, predictions, per-example losses), on `rows` only if given."""
    y_true, y_pred, losses = predictions
    if rows is not None:
        idx = np.asarray(rows, dtype=np.int64)
        y_true, y_pred, losses = y_true[idx], y_pred[idx], losses[idx]
    m = classification_metrics(y_true, y_pred, task.num_labels)
    return {**m, "loss": float(losses.mean()) if losses.size else 0.0, "score": task_score(task.metric, m),
            "metric_name": task.metric}


@torch.inference_mode()
def predict(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, batch_size: int,
            tally: Tally | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, predictions and per-example losses (float64) of the client's model on `encoded`, in the
    order of `encoded` (eval mode, no dropout). Examples run sorted by length, so a batch holds little padding."""
    fm.activate(cid, train=False)
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    preds, losses = np.zeros(len(encoded), dtype=np.int64), np.zeros(len(encoded), dtype=np.float64)
    for start, batch in zip(range(0, len(encoded), batch_size),
                            batches([encoded[i] for i in by_length], batch_size, shuffle=False, seed=None,
                                    pad_token_id=fm.backbone.tokenizer.pad_token_id, tally=tally)):
        logits = fm.logits(cid, batch)
        rows = by_length[start:start + batch_size]
        losses[rows] = cross_entropy(logits, batch["labels"].to(fm.device), reduction="none").double().cpu().numpy()
        preds[rows] = logits.argmax(dim=-1).cpu().numpy()
    y_true = np.array([r["labels"] for r in encoded], dtype=np.int64)
    return y_true, preds, losses


# What the representation rule needs besides the fingerprint: its sampling variance, that variance's degrees of freedom
# plus one, and the effective dimensions of its noise (phases.clustering.SamplingNoise), each one float32 on the wire.
NOISE_KEYS = ("representation_noise", "representation_count", "representation_dims")
# Per label of the client's label space: the sketched mean of its examples and their count (0 for a label left out),
# so the server can compare a cluster on the labels all its members hold (phases.clustering.SamplingNoise.members).
LABEL_KEYS = ("label_means", "label_counts")
# A label with fewer examples is left out of the fingerprint: a mean of one or two examples is nearly an example
# (privacy), and its noise is the least well estimated (docs/clustering.md, "Label skew").
MIN_LABEL_EXAMPLES = 3


def representation_layer(num_layers: int) -> int:
    """How many blocks the representation fingerprint runs: it pools the output of block ⌈L/3⌉ (1-based).
    Early-middle blocks still carry the lexical and stylistic cues that tell one task's text from another's;
    a sentence-embedding model's last block maps text of similar meaning together across tasks
    (docs/clustering.md), and the forward pass can stop there, at a third of the cost."""
    return max(1, math.ceil(num_layers / 3))


class _Stop(Exception):
    """Raised by a forward hook once the pooled block has run: the blocks above it are not needed."""


def forward_batch(batch_size: int) -> int:
    """Batch size of the forward-only representation pass: no activations are kept for a backward, so batches
    several times the training batch fit."""
    return max(4 * batch_size, 32)


def representation_pass(fm: FederatedLoRAModel, encoded: list[dict], *, batch_size: int,
                        max_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward passes only (frozen base, eval mode, adapters off, inference mode): the mean-pooled output of
    block `representation_layer` for each of the first `max_examples` training examples, as an n×hidden
    float64 matrix, with their labels in the same row order. Examples go through in length order so that
    batches carry little padding (the order does not matter for means and variances), and each pass stops
    after that block."""
    examples = sorted(encoded[:max_examples], key=lambda e: len(e["input_ids"]))
    _, blocks = transformer_blocks(fm.backbone.model)
    captured = []

    def keep_and_stop(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    model = fm.peft if fm.peft is not None else fm.backbone.model
    was_training = model.training
    model.eval()
    handle = blocks[representation_layer(len(blocks)) - 1].register_forward_hook(keep_and_stop)
    pooled = []
    try:
        with torch.inference_mode(), (fm.peft.disable_adapter() if fm.peft is not None else nullcontext()):
            for batch in batches(examples, batch_size, shuffle=False, seed=None,
                                 pad_token_id=fm.backbone.tokenizer.pad_token_id):
                mask = batch["attention_mask"].to(fm.device)
                try:
                    model(input_ids=batch["input_ids"].to(fm.device), attention_mask=mask)
                except _Stop:
                    pass
                pooled.append(masked_mean(captured.pop(), mask).double().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(pooled), torch.tensor([e["labels"] for e in examples], dtype=torch.long)


def gradient_pass(fm: FederatedLoRAModel, encoded: list[dict], *, num_labels: int,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Mean loss gradient w.r.t. every adapted module's frozen base weight over `encoded`, under a head
    initialised from the run seed shared by all clients (eval mode, no adapters). The base weights are left
    frozen as they came (requires_grad off, no .grad) and are never changed (tested bit for bit)."""
    head = fm.new_head(num_labels)
    weights = {m: fm.base_weight(m) for m in fm.modules}
    for w in weights.values():
        w.requires_grad_(True)
    model = fm.peft if fm.peft is not None else fm.backbone.model
    was_training = model.training
    model.eval()
    try:
        for batch in batches(encoded, batch_size, shuffle=False, seed=None,
                             pad_token_id=fm.backbone.tokenizer.pad_token_id):
            hidden = fm.hidden_states(batch, adapters=False)
            logits = head(fm.pool(hidden, batch["attention_mask"]))
            loss = cross_entropy(logits, batch["labels"].to(logits.device), reduction="sum") / len(encoded)
            loss.backward()
        return {m: w.grad.detach().double().cpu() for m, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.train(was_training)


def within_label_residuals(X: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row less its label's mean: (residuals, the labels present in ascending order, their means, their
    counts)."""
    held, index, counts = labels.unique(return_inverse=True, return_counts=True)
    means = torch.zeros(len(held), X.shape[1], dtype=X.dtype).index_add_(0, index, X) / counts.unsqueeze(1).to(X.dtype)
    return X - means[index], held, means, counts


def effective_dims(X: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """(tr Σ)² / tr Σ² of the rows' covariance: how many dimensions their noise really spreads over (1 … d).
    With `labels`, Σ is the pooled within-label covariance (each row centred on its label's mean, ν = n − L
    degrees of freedom for L labels), else the plain one (ν = n − 1). tr Σ² comes from its estimator unbiased
    under normality, ν²/((ν−1)(ν+2))·(tr S² − (tr S)²/ν) (Srivastava 2005, with ν for n − 1); with ν < 2, or
    an estimate ≤ 0, the bounds 1 resp. d stand in."""
    n, d = X.shape
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    residuals, _, means, _ = within_label_residuals(X, labels)
    dof = n - len(means)
    if dof < 2:
        return 1.0
    S = residuals.T @ residuals / dof
    tr, tr2 = float(S.trace()), float((S * S).sum())
    a2 = dof ** 2 / ((dof - 1) * (dof + 2)) * (tr2 - tr ** 2 / dof)
    return float(min(max(tr ** 2 / a2, 1.0), d)) if a2 > 0 else float(d)


def label_balanced_mean(X: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """The mean over the labels a client holds of its per-label mean row, with its sampling variance and
    that variance's degrees of freedom. Two clients of one task with different label mixes (Dirichlet
    shards) then share the expectation (1/L) Σ_l μ_l as long as they hold the same labels, where the plain
    mean would sit at their own mix Σ_l p_l μ_l and split the task. The variance is tr Cov of the estimate,
    tr S_w · Σ_l (1/n_l) / L², with S_w the pooled within-label covariance (n − L degrees of freedom); with
    one label, or balanced labels, all three equal the plain mean's."""
    residuals, _, means, counts = within_label_residuals(X, labels)
    held, dof = len(means), len(X) - len(means)
    pooled_trace = float((residuals ** 2).sum()) / max(dof, 1)
    return means.mean(0), pooled_trace * float((1 / counts.double()).sum()) / held ** 2, dof


def kept_examples(labels: torch.Tensor) -> torch.Tensor:
    """Mask of the examples whose label the client holds at least MIN_LABEL_EXAMPLES of (all of them when no
    label does: a client that small has no larger aggregate to send, and would otherwise send nothing)."""
    _, index, counts = labels.unique(return_inverse=True, return_counts=True)
    keep = (counts >= MIN_LABEL_EXAMPLES)[index]
    return keep if keep.any() else torch.ones_like(keep)


def package_fingerprint(pooled: torch.Tensor, labels: torch.Tensor, grads: dict[str, torch.Tensor],
                        modules: list[str], *, num_labels: int, layers: int, dim: int, seed: int) -> dict:
    """What leaves the client, all float32 aggregates. The representation
    numbers come from the examples of the labels it holds at least MIN_LABEL_EXAMPLES of (`kept_examples`):

    - `representation`: the count sketch (shared seed) of the label-balanced mean pooled representation
      (`label_balanced_mean`), `dim` numbers;
    - `label_means`, `label_counts`: per label of its `num_labels`, the sketched mean of its examples and their
      count (zeros for a label it lacks or left out), `num_labels` × (`dim` + 1) numbers: the server scores a
      cluster on the labels every member holds, so a client that lacks a label is not taken for another task;
    - `representation_noise`: the sampling variance of that mean, measured on the sketched examples (the
      sketch is linear), so in the very space the server compares clients in;
    - `representation_count`: the degrees of freedom of that variance plus one, n − L + 1 for n examples of
      L labels (n when one label): what the server's test needs of the examples behind it;
    - `representation_dims`: the effective dimensions of the examples' within-label spread
      (`effective_dims`), which with the count sets how noisy the server's spread-to-noise ratio is;
    - `gradient`: the count sketch of the gradient on the last `layers` blocks' adapted modules;
    - `importance`: each adapted module's gradient norm.
    """
    keep = kept_examples(labels)
    sketched, labels = count_sketch_rows(pooled[keep], dim, seed), labels[keep]
    mean, noise, dof = label_balanced_mean(sketched, labels)
    _, held, means, counts = within_label_residuals(sketched, labels)
    label_means, label_counts = torch.zeros(num_labels, dim, dtype=means.dtype), torch.zeros(num_labels)
    label_means[held], label_counts[held] = means, counts.float()
    last_blocks = sorted({layer_index(m) for m in modules})[-layers:]
    grad_vec = torch.cat([grads[m].flatten() for m in modules if layer_index(m) in last_blocks])
    # Every number is float32, as uploaded and as counted, so both engines plan from identical values.
    return {
        "representation": mean.float().numpy(),
        "representation_noise": float(np.float32(noise)),
        "representation_count": float(dof + 1),
        "representation_dims": float(np.float32(effective_dims(sketched, labels))),
        "label_means": label_means.float().numpy(),
        "label_counts": label_counts.numpy(),
        "gradient": count_sketch(grad_vec, dim, seed).float().numpy(),
        "importance": {m: float(np.float32(g.norm())) for m, g in grads.items()},
    }


def fingerprint(fm: FederatedLoRAModel, encoded: list[dict], *, num_labels: int, samples: int, batch_size: int,
                layers: int, dim: int, seed: int, representation_samples: int,
                represent=representation_pass) -> dict:
    """Phase 1 on the client (DESIGN §3.1), from its training examples only: forward passes over up to
    `representation_samples` of them for the representation fingerprint (forward-only passes are cheap next
    to a round's training, so it can read many more than the gradient pass), a forward and backward pass over
    `samples` of them for the gradient fingerprint and the importances; see `package_fingerprint` for what
    is uploaded. `represent` stands in for `representation_pass` where its rows are already known
    (benchmarks/clustering.py reuses them across seeds)."""
    pooled, labels = represent(fm, encoded, batch_size=forward_batch(batch_size), max_examples=representation_samples)
    grads = gradient_pass(fm, encoded[:samples], num_labels=num_labels, batch_size=batch_size)
    return package_fingerprint(pooled, labels, grads, fm.modules, num_labels=num_labels, layers=layers, dim=dim,
                               seed=seed)
