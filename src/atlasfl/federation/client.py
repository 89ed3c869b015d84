"""Client-side work on the shared model: local training and evaluation of one client's adapter and
head, what a state looks like after a trip over the wire, and the phase-1 fingerprint.

Both engines call these functions; they only need the model, the client id and encoded examples.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import Tally, batches
from atlasfl.data.tasks import TaskData
from atlasfl.metrics import classification_metrics, task_score
from atlasfl.models.lora import FederatedLoRAModel, layer_index
from atlasfl.phases.sketch import count_sketch

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
    for epoch in range(epochs):
        for batch in batches(encoded, batch_size, shuffle=True, seed=seed + epoch, group_by_length=group_by_length,
                             pad_token_id=fm.backbone.tokenizer.pad_token_id, tally=tally):
            loss = cross_entropy(fm.logits(cid, batch), batch["labels"].to(fm.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def wire(state: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state as it arrives after a trip at the wire dtype, and the bytes that trip carried."""
    wd = WIRE_DTYPES[dtype]
    sent = {k: v.to(wd) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in sent.values())
    return {k: v.to(state[k].dtype) for k, v in sent.items()}, nbytes


def evaluate_client(fm: FederatedLoRAModel, cid: int, encoded: list[dict], task: TaskData, batch_size: int,
                    tally: Tally | None = None) -> dict:
    """The client's metrics on `encoded`: GLUE metric of its task (`score`), accuracy, F1s, MCC, loss."""
    y_true, y_pred, loss = predict(fm, cid, encoded, batch_size=batch_size, tally=tally)
    m = classification_metrics(y_true, y_pred, task.num_labels)
    return {**m, "loss": loss, "score": task_score(task.metric, m), "metric_name": task.metric}


@torch.inference_mode()
def predict(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, batch_size: int,
            tally: Tally | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, predictions and mean loss of the client's model on `encoded`, in the order of `encoded`
    (eval mode, no dropout). Examples run sorted by length, so a batch holds little padding."""
    fm.activate(cid, train=False)
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    preds, losses = np.zeros(len(encoded), dtype=np.int64), []
    for start, batch in zip(range(0, len(encoded), batch_size),
                            batches([encoded[i] for i in by_length], batch_size, shuffle=False, seed=None,
                                    pad_token_id=fm.backbone.tokenizer.pad_token_id, tally=tally)):
        logits = fm.logits(cid, batch)
        losses.append(cross_entropy(logits, batch["labels"].to(fm.device), reduction="none").double().cpu())
        preds[by_length[start:start + batch_size]] = logits.argmax(dim=-1).cpu().numpy()
    y_true = np.array([r["labels"] for r in encoded], dtype=np.int64)
    loss = float(torch.cat(losses).sum()) if losses else 0.0
    return y_true, preds, loss / max(len(y_true), 1)


def fingerprint(fm: FederatedLoRAModel, encoded: list[dict], *, num_labels: int, samples: int, batch_size: int,
                layers: int, dim: int, seed: int) -> dict:
    """Phase 1 on the client: one pass of `samples` examples through the frozen base (eval mode, no adapters).

    Returns the representation fingerprint (mean over examples of the mean-pooled last hidden state),
    the gradient fingerprint (mean loss gradient w.r.t. the adapted attention projections of the
    last `layers` blocks, under a head initialised from the run seed shared by all clients), both
    count-sketched to `dim` numbers with the shared seed, the sampling variance of the representation
    mean (one number), and each adapted module's gradient norm as its importance. Only these numbers
    leave the client.
    """
    examples = encoded[:samples]
    head = fm.new_head(num_labels)
    weights = {m: fm.base_weight(m) for m in fm.modules}
    for w in weights.values():
        w.requires_grad_(True)
    model = fm.peft if fm.peft is not None else fm.backbone.model
    was_training = model.training
    model.eval()
    pooled = []
    try:
        for batch in batches(examples, batch_size, shuffle=False, seed=None,
                             pad_token_id=fm.backbone.tokenizer.pad_token_id):
            hidden = fm.hidden_states(batch, adapters=False)
            mask = batch["attention_mask"].to(hidden.device).unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1)).detach().double().cpu())
            logits = head(fm.pool(hidden, batch["attention_mask"]))
            loss = cross_entropy(logits, batch["labels"].to(logits.device), reduction="sum") / len(examples)
            loss.backward()
        grads = {m: w.grad.detach().double().cpu() for m, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.train(was_training)
    last_blocks = sorted({layer_index(m) for m in fm.modules})[-layers:]
    grad_vec = torch.cat([grads[m].flatten() for m in fm.modules if layer_index(m) in last_blocks])
    # Each example sketched on its own (the sketch is linear): the mean and its sampling variance
    # (trace), in the very space the server compares clients in.
    sketched = torch.stack([count_sketch(p, dim, seed) for p in torch.cat(pooled)]).double()
    mean = sketched.mean(0)
    noise = float(((sketched - mean) ** 2).sum(1).sum()) / max(len(sketched) - 1, 1) / len(sketched)
    # Every number is float32, as uploaded and as counted, so both engines plan from identical values.
    return {
        "representation": mean.float().numpy(),
        "representation_noise": float(np.float32(noise)),
        "gradient": count_sketch(grad_vec, dim, seed).float().numpy(),
        "importance": {m: float(np.float32(g.norm())) for m, g in grads.items()},
    }
