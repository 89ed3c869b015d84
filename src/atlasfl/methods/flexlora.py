"""`flexlora` (Bai et al., NeurIPS 2024): every client's rank-r_k truncated SVD of the group's shard-weighted mean
update ΔW = Σ_k p_k·(α/r_k)·B_k A_k. That is `aggregate_states(..., mode="svd")` (the rule `atlas_no_laplacian`
uses inside clusters), so the method is the base `aggregate` over every client (`--sharing all`, its paper's
setting); `--sharing cluster` is `atlas_no_laplacian`'s rule under another name, kept to tell the two effects apart.

One difference from FlexLoRA's code: it puts all singular values in B (A = V_rᵀ), ATLAS puts √S on each factor.
The update a client receives, scale·B@A, is the same; its next local training starts from other factors (AdamW is
not invariant to that), which keeps this rule identical to `atlas_no_laplacian`'s. Heads: the shard-weighted mean
among clients whose heads have the same shape (the paper's tasks share no head; it does not say)."""
from __future__ import annotations

from atlasfl.methods.field import FieldMethod


class FlexLoRA(FieldMethod):
    name = "flexlora"
    summary = ("Per-device, per-module ranks; every client gets its own-rank truncated SVD of the shard-weighted "
               "mean update over all clients (Bai et al., 2024).")
    heterogeneous_ranks = True
    default_aggregation = "svd"

    @classmethod
    def check(cls, cfg):
        if cfg.aggregation == "fedavg":
            raise ValueError("flexlora's rule is the SVD of the mean update; --aggregation fedavg is another "
                             "method (hetlora, or standard_fl at one rank): drop it")
