"""Classification metrics with GLUE conventions, computed from one confusion matrix.

Numpy only, so results do not depend on a library's warning or zero-division policy; the tests
check every value against scikit-learn.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atlasfl.errors import AtlasError

TASK_METRICS = ("accuracy", "f1", "mcc")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """Counts with true labels on rows and predictions on columns (num_labels × num_labels)."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    for name, labels in (("y_true", t), ("y_pred", p)):
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(f"{name} has labels outside [0, {num_labels})")
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def _mcc(cm: np.ndarray) -> float:
    """Gorodkin's multi-class MCC (equals the binary formula for two classes); 0 when undefined."""
    c = cm.astype(np.float64)
    n = c.sum()
    correct = np.trace(c)
    true_counts = c.sum(axis=1)
    pred_counts = c.sum(axis=0)
    cov_tp = correct * n - true_counts @ pred_counts
    cov_tt = n * n - true_counts @ true_counts
    cov_pp = n * n - pred_counts @ pred_counts
    denom = np.sqrt(cov_tt * cov_pp)
    return float(cov_tp / denom) if denom > 0 else 0.0


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict:
    """accuracy, macro_f1 (over classes seen in labels or predictions), f1 (class 1, binary only), mcc."""
    cm = confusion_matrix(y_true, y_pred, num_labels)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    per_class = [_f1(tp[i], fp[i], fn[i]) for i in range(num_labels) if present[i]]
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "macro_f1": float(np.mean(per_class)),
        "f1": _f1(tp[1], fp[1], fn[1]) if num_labels == 2 else None,
        "mcc": _mcc(cm),
    }


def task_score(metric: str, metrics: dict) -> float:
    """The task's headline score (GLUE convention): 'accuracy', 'f1' or 'mcc'."""
    if metric not in TASK_METRICS:
        raise AtlasError(f"unknown task metric '{metric}'; choose one of {', '.join(TASK_METRICS)}")
    value = metrics.get(metric)
    if value is None:
        raise AtlasError(f"metric '{metric}' is undefined here (f1 needs a binary task)")
    return float(value)


def majority_scores(train_labels: Sequence[int], test_labels: Sequence[int], num_labels: int, metric: str) -> dict:
    """Every metric of always predicting the most frequent training label (the smallest label on ties)
    on `test_labels`, and the task's headline `score`: what a model learns for free from the label mix."""
    label = int(np.argmax(np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_labels)))
    m = classification_metrics(test_labels, [label] * len(test_labels), num_labels)
    return {**m, "score": task_score(metric, m)}


def chance_scores(test_labels: Sequence[int], num_labels: int, metric: str) -> dict:
    """Every metric of guessing labels uniformly at random, from the expected confusion counts on
    `test_labels` (prevalences π_l, K = num_labels): each true-l row spreads n·π_l/K over every column, so
    accuracy = 1/K; F1 of class l = 2·π_l·(1/K) / (π_l + 1/K) = 2π_l / (Kπ_l + 1) (precision π_l, recall
    1/K), binary `f1` that of class 1 and `macro_f1` their mean over all K classes (each is predicted);
    MCC = 0 (predictions independent of the labels). Plus the task's headline `score`."""
    counts = np.bincount(np.asarray(test_labels, dtype=np.int64), minlength=num_labels)
    if counts.sum() == 0:
        raise ValueError("cannot score an empty set of labels")
    prevalence = counts / counts.sum()
    per_class = 2 * prevalence / (num_labels * prevalence + 1)
    m = {"accuracy": 1.0 / num_labels, "macro_f1": float(per_class.mean()),
         "f1": float(per_class[1]) if num_labels == 2 else None, "mcc": 0.0}
    return {**m, "score": task_score(metric, m)}
