"""The personal protocol (docs/design.md §1): each client's personal test rows follow its own label mix, come from
the test split only and are derivable from the client's id alone; the reference points are exact."""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from atlasfl.data.partition import ClientShard, make_shards, personal_test_rows
from atlasfl.data.tasks import Example, TaskData
from atlasfl.errors import AtlasError
from atlasfl.federation.records import client_references, load_client_data
from atlasfl.metrics import chance_scores, majority_scores
from tests.conftest import tiny_config


def _task(name="t", n_train=600, test_labels=(0,) * 60 + (1,) * 30 + (2,) * 10):
    """Training pool and test set with the same label mix (60/30/10)."""
    train = [Example(f"train {i}", None, test_labels[i % len(test_labels)]) for i in range(n_train)]
    test = [Example(f"test {i}", None, label) for i, label in enumerate(test_labels)]
    return TaskData(name, 3, "accuracy", train, test)


def test_personal_rows_take_the_largest_set_that_fits_the_mix():
    # p = (3/4, 1/4, 0); the test set holds 40, 5 and 7 rows: round(n/4) <= 5 holds up to n = 21
    # (21/4 = 5.25 -> 5; 22/4 = 5.5 -> 6), round(3n/4) <= 40 up to n = 53: so 16 rows of label 0, 5 of label 1.
    test = [0] * 40 + [1] * 5 + [2] * 7
    rows = personal_test_rows([0] * 30 + [1] * 10, test, 3, seed=7)
    assert Counter(test[i] for i in rows) == {0: 16, 1: 5}
    assert list(rows) == sorted(set(rows))  # sorted row indices, no repeats
    assert rows == personal_test_rows([0] * 30 + [1] * 10, test, 3, seed=7)
    assert rows != personal_test_rows([0] * 30 + [1] * 10, test, 3, seed=8)
    # a client with the test set's own mix gets the whole test set
    assert personal_test_rows([0] * 40 + [1] * 5 + [2] * 7, test, 3, seed=7) == tuple(range(len(test)))


def test_personal_rows_fail_clearly_when_nothing_fits():
    with pytest.raises(AtlasError, match="no personal test set fits.*raise --max-test-samples"):
        personal_test_rows([1] * 10, [0] * 20, 2, seed=0)  # the client only has label 1; the test set has none


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_personal_sets_follow_each_clients_mix_and_never_touch_its_training_data(alpha):
    task = _task()
    shards = make_shards([task], 4, seed=3, max_samples=None, dirichlet_alpha=alpha)
    mixes = set()
    for s in shards:
        personal = [task.test[i] for i in s.personal]
        own = Counter(ex.label for ex in s.train + s.val)
        p = np.array([own[label] for label in range(3)]) / sum(own.values())
        counts = Counter(ex.label for ex in personal)
        n = len(personal)
        assert n > 0 and all(abs(counts[label] - p[label] * n) <= 1 for label in range(3)), (p, counts)
        # disjoint from the client's training and validation examples (the texts differ by split, so this
        # checks the rows come from the test split)
        assert not {ex.text for ex in personal} & {ex.text for ex in s.train + s.val}
        mixes.add(tuple(counts[label] for label in range(3)))
    if alpha is None:  # IID: every mix is close to the test set's own (60/30/10), so most of it is used
        assert all(sum(m) >= 80 for m in mixes)
    else:  # Dirichlet skew: the clients' personal mixes differ
        assert len(mixes) == len(shards)


def test_a_client_derives_its_personal_rows_from_its_id_alone(tmp_path):
    cfg = tiny_config(tmp_path, dirichlet_alpha=0.5)
    from atlasfl.data.tasks import expand_tasks, load_task

    tasks = [load_task(n, max_test=cfg.max_test_samples) for n in expand_tasks(cfg.tasks)]
    shards = make_shards(tasks, cfg.clients_per_task, seed=cfg.seed, max_samples=cfg.max_samples,
                         dirichlet_alpha=cfg.dirichlet_alpha)
    for s in shards:
        alone, _ = load_client_data(cfg, s.client_id)
        assert alone.personal == s.personal and len(s.personal) > 0


# ---- reference points: hand counts ------------------------------------------------------------


def test_majority_scores_equal_a_hand_count():
    test = [0, 1, 1, 0, 0]
    m = majority_scores([0, 0, 0, 1], test, 2, "accuracy")  # always 0: 3 of 5 right
    assert m["accuracy"] == m["score"] == 3 / 5
    assert m["f1"] == 0.0  # class 1 is never predicted
    assert m["macro_f1"] == pytest.approx((2 * 3 / (2 * 3 + 2) + 0.0) / 2)  # class 0: tp 3, fp 2
    assert m["mcc"] == 0.0
    m = majority_scores([1, 1, 0], test, 2, "f1")  # always 1: tp 2, fp 3, fn 0
    assert m["score"] == m["f1"] == pytest.approx(4 / 7) and m["accuracy"] == 2 / 5
    assert majority_scores([0, 1], test, 2, "accuracy")["accuracy"] == 3 / 5  # ties: the smaller label
    assert majority_scores([2, 2, 0], [0, 1, 2, 2], 3, "mcc")["score"] == 0.0


def test_chance_scores_equal_expected_confusion_counts():
    # 5 rows, prevalence (3/5, 2/5), K = 2: each true row splits evenly over both predictions
    c = chance_scores([0, 1, 1, 0, 0], 2, "f1")
    assert c["accuracy"] == 0.5 and c["mcc"] == 0.0
    f1_pos = Fraction(2 * 1, 2 * 1 + 3 * Fraction(1, 2) + 1)  # tp 1, fp 3/2, fn 1 -> 2/(2+2.5) = 4/9
    f1_neg = Fraction(2 * Fraction(3, 2), 2 * Fraction(3, 2) + 1 + Fraction(3, 2))  # tp 3/2, fp 1, fn 3/2 -> 6/11
    assert c["score"] == c["f1"] == pytest.approx(float(f1_pos)) == pytest.approx(4 / 9)
    assert c["macro_f1"] == pytest.approx(float((f1_pos + f1_neg) / 2))
    # three classes, counts (2, 1, 1): class 0 has tp 2/3, fp 2/3, fn 4/3 -> 0.4; classes 1, 2: tp 1/3, fp 1, fn 2/3
    c = chance_scores([0, 0, 1, 2], 3, "accuracy")
    assert c["score"] == c["accuracy"] == pytest.approx(1 / 3) and c["f1"] is None
    assert c["macro_f1"] == pytest.approx((0.4 + 2 * (2 / 3) / (2 / 3 + 1 + 2 / 3)) / 3)
    assert chance_scores([0, 1], 2, "mcc")["score"] == 0.0


def test_client_references_use_the_pool_for_global_and_the_clients_own_majority_for_personal():
    task = TaskData("t", 2, "accuracy", [Example("a", None, 0)] * 5 + [Example("b", None, 1)] * 3,
                    [Example(f"x{i}", None, label) for i, label in enumerate([0, 0, 0, 1, 1])])
    shard = ClientShard(0, "t", train=[Example("b", None, 1)] * 2, val=[Example("a", None, 0)], personal=(1, 3, 4))
    refs = client_references(shard, task)
    assert refs["global"]["majority"]["score"] == 3 / 5  # the pool's majority 0 on the whole test set
    assert refs["personal"]["majority"]["score"] == 2 / 3  # the client's majority 1 on rows 1, 3, 4 (labels 0, 1, 1)
    assert refs["global"]["chance"]["score"] == refs["personal"]["chance"]["score"] == 0.5


def test_val_fraction_setting_sizes_every_clients_validation(tmp_path):
    cfg = tiny_config(tmp_path, max_samples=40, val_fraction=0.25)
    for cid in range(4):
        shard, _ = load_client_data(cfg, cid)
        assert (len(shard.train), len(shard.val)) == (30, 10)
