"""An ambiguous phase 1 (the next larger k also fits, docs/clustering.md) is said in the log, on stderr and in
`atlas run`'s summary; a clear one is not."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from atlasfl.cli.run import print_summary
from atlasfl.federation.records import ambiguity_warning, warn_ambiguous

AMBIGUOUS = dict(k=3, ambiguous=True, margin=-0.258, split=dict(statistic=1.98, threshold=1.53, k_next=4))
CLEAR = dict(AMBIGUOUS, ambiguous=False, margin=0.2)
WARNING = ("warning: phase 1 is ambiguous: k = 3 passed its bar, but k = 4 also fits (split test G = 1.98 above "
           "1.53); margin -0.258. Two tasks may share a cluster (docs/clustering.md)")


def test_the_warning_names_both_ks_the_test_and_the_margin_and_only_when_ambiguous():
    assert ambiguity_warning(AMBIGUOUS) == WARNING
    assert ambiguity_warning(CLEAR) is None
    assert ambiguity_warning(dict(AMBIGUOUS, ambiguous=None)) is None  # silhouette rule: no split test
    assert ambiguity_warning(None) is None  # a method without phase 1


def test_the_log_and_stderr_carry_it(caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="atlasfl"):
        warn_ambiguous(SimpleNamespace(phase1=AMBIGUOUS))
        warn_ambiguous(SimpleNamespace(phase1=CLEAR))
    assert [r.getMessage() for r in caplog.records] == [WARNING]
    assert capsys.readouterr().err == WARNING + "\n"


def test_the_run_summary_prints_it(capsys):
    result = dict(run_name="r", cluster_labels=[0, 0, 1], cluster_source="fingerprint", time_metrics={"total_s": 1.0},
                  final_metrics={"per_task": {}, "task_mean": 0.5}, phase1_clustering=AMBIGUOUS)
    print_summary(result, "results/r.json")
    assert WARNING in capsys.readouterr().out.replace("\n", "")
    print_summary(dict(result, phase1_clustering=CLEAR), "results/r.json")
    assert "ambiguous" not in capsys.readouterr().out
