"""`--robust-aggregation` in tiny in-process runs: with a reply inflated 50x (under the norm bound, so aggregated),
every member's new state is the coordinate-wise median (or trimmed mean) of its group's uploads."""
from __future__ import annotations

import pytest
import torch

from atlasfl.engines import inprocess
from atlasfl.federation.server import Server
from atlasfl.phases.aggregation import coordinate_median, trimmed_mean


@pytest.mark.parametrize("method, rule, combine", [
    ("standard_fl", "median", coordinate_median),
    ("ffa_lora", "trimmed_mean", lambda ts: trimmed_mean(ts, 0.25)),
])
def test_each_member_gets_the_robust_combination_of_its_groups_uploads(make_config, monkeypatch, method, rule,
                                                                       combine):
    real_train, real_aggregate, seen = inprocess.InProcess.train, Server.aggregate, []

    def inflated(self, round_idx, cohort, sharing, advance, **kw):
        out = real_train(self, round_idx, cohort, sharing, advance, **kw)
        out.uploads[3] = {k: v * 50 for k, v in out.uploads[3].items()}
        return out

    def spy(self, uploads, missing=frozenset(), absent=frozenset(), round_idx=0, within_clip=None):
        new = real_aggregate(self, uploads, missing, absent, round_idx, within_clip)
        seen.append((dict(uploads), new))
        return new

    monkeypatch.setattr(inprocess.InProcess, "train", inflated)
    monkeypatch.setattr(Server, "aggregate", spy)
    result = inprocess.run_experiment(make_config(method=method, robust_aggregation=rule, trim_fraction=0.25),
                                      progress=False)
    assert all(r["missing_clients"] == [] for r in result["round_metrics"])  # 50x is under --reply-norm-bound 100
    assert len(seen) == 2
    for uploads, new in seen:
        assert sorted(new) == [0, 1, 2, 3]  # one group of every client
        for key in uploads[0]:
            expected = combine([uploads[c][key] for c in range(4)])
            assert all(torch.equal(new[c][key], expected) for c in range(4)), key
        assert not torch.equal(new[0][key], torch.stack([uploads[c][key] for c in range(4)]).mean(0))
