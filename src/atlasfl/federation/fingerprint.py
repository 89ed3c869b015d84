"""Phase 1 on the client: the model passes behind its fingerprint (representation and gradient) and the
package it uploads; the statistics over their outputs are in `phases.fingerprint`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import batches
from atlasfl.heap import release_freed_memory
from atlasfl.models.lora import FederatedLoRAModel, layer_index, masked_mean, transformer_blocks
from atlasfl.phases.fingerprint import effective_dims, kept_examples, label_balanced_mean, within_label_residuals
from atlasfl.phases.sketch import count_sketch, count_sketch_rows


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
    """Phase 1 on the client (docs/design.md §3.1), from its training examples only: forward passes over up to
    `representation_samples` of them for the representation fingerprint (forward-only passes are cheap next
    to a round's training, so it can read many more than the gradient pass), a forward and backward pass over
    `samples` of them for the gradient fingerprint and the importances; see `package_fingerprint` for what
    is uploaded. `represent` stands in for `representation_pass` where its rows are already known
    (benchmarks/clustering.py reuses them across seeds)."""
    pooled, labels = represent(fm, encoded, batch_size=forward_batch(batch_size), max_examples=representation_samples)
    grads = gradient_pass(fm, encoded[:samples], num_labels=num_labels, batch_size=batch_size)
    upload = package_fingerprint(pooled, labels, grads, fm.modules, num_labels=num_labels, layers=layers, dim=dim,
                                 seed=seed)
    del pooled, grads
    release_freed_memory()  # the passes' tensors: otherwise a population's phase 1 grows the heap per client
    return upload
