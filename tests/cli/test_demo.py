"""The demo's comparison table and its sentence, built from constructed results: every number and word comes
from the results."""
from __future__ import annotations

from pathlib import Path

from atlasfl.demo import compare

TASKS = ("movie_sentiment", "sms_spam")
REFS = {"movie_sentiment": (0.75, 0.5), "sms_spam": (0.83, 0.5)}


def result(method: str, scores: dict[str, float], *, eta=None, ari=1.0, up=1_000_000, down=500_000, seconds=41.6):
    per_task = {t: dict(metric_name="accuracy", score=s) for t, s in scores.items()}
    return dict(
        method=method, config=dict(eta=eta) if eta is not None else {},
        final_metrics=dict(personal_per_task=per_task, personal_task_mean=sum(scores.values()) / len(scores),
                           per_task={t: dict(metric_name="accuracy", score=0.0) for t in scores}, task_mean=0.0),
        references={t: {"personal": {"majority": {"score": REFS[t][0]}, "chance": {"score": REFS[t][1]}},
                        "global": {"majority": {"score": 0.0}, "chance": {"score": 0.0}}} for t in scores},
        cluster_labels=[0, 0, 1, 1], phase1_clustering=None if ari is None else dict(ari=ari),
        communication_costs=dict(total_bytes_up=up, total_bytes_down=down),
        time_metrics=dict(total_s=seconds))


def test_the_table_holds_each_methods_scores_the_references_clusters_bytes_and_seconds():
    results = {"local_only": result("local_only", {"movie_sentiment": 0.80, "sms_spam": 0.97}, up=0, down=0, ari=None),
               "fedavg_cluster": result("fedavg_cluster", {"movie_sentiment": 0.78, "sms_spam": 0.95}, ari=0.5),
               "atlas": result("atlas", {"movie_sentiment": 0.84, "sms_spam": 0.98}, eta=1.0, seconds=60.4)}
    c = compare(results, {m: Path("results/demo") / f"{m}.json" for m in results})
    assert c.header == ["", "local_only", "fedavg_cluster", "atlas (η=1)", "majority", "chance"]
    assert c.rows == [
        ["movie_sentiment (accuracy)", "0.800", "0.780", "0.840", "0.750", "0.500"],
        ["sms_spam (accuracy)", "0.970", "0.950", "0.980", "0.830", "0.500"],
        ["task mean", "0.885", "0.865", "0.910", "0.790", "0.500"],
        ["clusters (ARI)", "0 0 1 1", "0 0 1 1 (0.50)", "0 0 1 1 (1.00)", "", ""],
        ["MB sent (up + down)", "0.0", "1.5", "1.5", "", ""],
        ["seconds", "42", "42", "60", "", ""]]
    assert c.sentence == ("atlas (η=1) is best on the personal task mean, 0.910, +0.025 against the best baseline "
                          "(local_only, 0.885); every score is above its task's majority reference; result files in "
                          "results/demo/, compared in full by `atlas report results/demo`.")


def test_the_sentence_says_when_atlas_is_not_best_and_which_scores_do_not_clear_the_majority():
    results = {"local_only": result("local_only", {"movie_sentiment": 0.80, "sms_spam": 0.83}),
               "fedavg_cluster": result("fedavg_cluster", {"movie_sentiment": 0.90, "sms_spam": 0.95}),
               "atlas": result("atlas", {"movie_sentiment": 0.74, "sms_spam": 0.96}, eta=0.5)}
    c = compare(results)
    assert c.sentence == ("atlas (η=0.5) is not best on the personal task mean: 0.850, -0.075 against "
                          "fedavg_cluster (0.925); not above the majority reference: atlas on movie_sentiment, "
                          "local_only on sms_spam.")
    assert compare(results, protocol="global").rows[0][1:4] == ["0.000", "0.000", "0.000"]
