"""Statistics of a client's phase-1 fingerprint, over tensors only (no model), and the keys of what it
uploads besides the fingerprint, which the server reads."""
from __future__ import annotations

import torch

# What the representation rule needs besides the fingerprint: its sampling variance, that variance's degrees of freedom
# plus one, and the effective dimensions of its noise (phases.clustering.SamplingNoise), each one float32 on the wire.
NOISE_KEYS = ("representation_noise", "representation_count", "representation_dims")
# Per label of the client's label space: the sketched mean of its examples and their count (0 for a label left out),
# so the server can compare a cluster on the labels all its members hold (phases.clustering.SamplingNoise.members).
LABEL_KEYS = ("label_means", "label_counts")
# A label with fewer examples is left out of the fingerprint: a mean of one or two examples is nearly an example
# (privacy), and its noise is the least well estimated (docs/clustering.md, "Label skew").
MIN_LABEL_EXAMPLES = 3


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
