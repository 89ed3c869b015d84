"""Evaluation of one client's adapter and head: predictions over encoded examples and their metrics."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from atlasfl.data.batching import Tally, batches
from atlasfl.data.tasks import TaskData
from atlasfl.metrics import classification_metrics, task_score
from atlasfl.models.lora import FederatedLoRAModel


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


def adopt_lowest(fm: FederatedLoRAModel, cid: int, encoded: list[dict], candidates: Sequence[dict], *,
                 batch_size: int) -> int:
    """The client scores each candidate state by its mean loss on `encoded` (its training shard; eval mode), adopts
    the lowest (the first on ties: `phases.ifca.lowest`) and returns its index."""
    from atlasfl.phases.ifca import lowest

    losses = []
    for state in candidates:
        fm.set_state(cid, state, partial=True)
        losses.append(float(predict(fm, cid, encoded, batch_size=batch_size)[2].mean()))
    best = lowest(losses)
    fm.set_state(cid, candidates[best], partial=True)
    return best


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
