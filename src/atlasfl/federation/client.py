"""Client-side work on the shared model: local training and evaluation of one client's adapter and head.

Both engines call these functions; they only need the model, the client id and encoded examples.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import batches
from atlasfl.models.lora import FederatedLoRAModel


def client_seed(seed: int, round_idx: int, cid: int) -> int:
    """Per (run, round, client) seed: batch order and dropout do not depend on what ran before."""
    return (seed * 1_000_003 + round_idx * 10_007 + cid) % (2**31)


def train_local(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, epochs: int, lr: float,
                batch_size: int, seed: int, max_grad_norm: float = 1.0) -> float:
    """`epochs` passes of AdamW over the client's shard; returns the mean training loss.

    The optimizer is created afresh each round: after aggregation the old moments describe weights
    the client no longer holds, and a fresh optimizer keeps resume exact without saving them.
    """
    torch.manual_seed(seed)
    fm.activate(cid, train=True)
    params = fm.trainable_parameters(cid)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for epoch in range(epochs):
        for batch in batches(encoded, batch_size, shuffle=True, seed=seed + epoch,
                             pad_token_id=fm.backbone.tokenizer.pad_token_id):
            loss = cross_entropy(fm.logits(cid, batch), batch["labels"].to(fm.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def predict(fm: FederatedLoRAModel, cid: int, encoded: list[dict], *, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, predictions and mean loss of the client's model on `encoded` (eval mode, no dropout)."""
    fm.activate(cid, train=False)
    labels, preds, loss_sum = [], [], 0.0
    for batch in batches(encoded, batch_size, shuffle=False, seed=None,
                         pad_token_id=fm.backbone.tokenizer.pad_token_id):
        logits = fm.logits(cid, batch)
        y = batch["labels"].to(fm.device)
        loss_sum += cross_entropy(logits, y, reduction="sum").item()
        labels.append(y.cpu().numpy())
        preds.append(logits.argmax(dim=-1).cpu().numpy())
    y_true, y_pred = np.concatenate(labels), np.concatenate(preds)
    return y_true, y_pred, loss_sum / max(len(y_true), 1)
