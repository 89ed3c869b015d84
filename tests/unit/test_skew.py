"""Skew partitions beyond Dirichlet: pathological label skew (--labels-per-client) and quantity skew
(--quantity-skew), their composition, their errors, and the personal test rows they lead to."""

from collections import Counter

import numpy as np
import pytest

from atlasfl.data.partition import make_shards, partition_task, quantity_sizes
from atlasfl.data.tasks import Example, TaskData, load_task
from atlasfl.errors import AtlasError
from atlasfl.federation.records import load_client_data
from tests.conftest import tiny_config


def _examples(n, num_labels):
    return [Example(f"text {i}", None, i % num_labels) for i in range(n)]


def _label_sets(parts):
    return [{ex.label for ex in tr + va} for tr, va in parts]


def _rows(parts):
    return [ex.text for tr, va in parts for ex in tr + va]


def test_each_client_holds_exactly_its_labels_dealt_in_turn():
    data = _examples(600, 6)
    parts = partition_task(data, 5, seed=3, max_samples=None, labels_per_client=2)
    sets = _label_sets(parts)
    assert all(len(s) == 2 for s in sets)
    holders = Counter(label for s in sets for label in s)
    assert set(holders) == set(range(6))  # 5 clients x 2 labels cover all 6 labels
    assert sorted(holders.values()) == [1, 1, 2, 2, 2, 2]  # 10 places over 6 labels, spread evenly
    for label, k in holders.items():  # a label's 100 rows go to its holders in equal parts
        counts = [sum(ex.label == label for ex in tr + va) for tr, va in parts if label in {e.label for e in tr + va}]
        assert sorted(counts) == ([100] if k == 1 else [50, 50])
    assert len(_rows(parts)) == len(set(_rows(parts))) == 600  # no row in two shards, every row used


def test_labels_per_client_extremes_give_exact_label_sets():
    data = _examples(300, 3)
    one_each = partition_task(data, 3, seed=0, max_samples=None, labels_per_client=1)
    assert sorted(map(sorted, _label_sets(one_each))) == [[0], [1], [2]]  # one label each, all distinct
    every = partition_task(data, 4, seed=0, max_samples=None, labels_per_client=3)
    assert _label_sets(every) == [{0, 1, 2}] * 4


def test_labels_nobody_holds_are_left_out():
    parts = partition_task(_examples(600, 6), 2, seed=5, max_samples=None, labels_per_client=2)
    assert len(set().union(*_label_sets(parts))) == 4
    assert len(_rows(parts)) == 400  # the two labels without a holder: their 200 rows are not used


def test_skew_partitions_repeat_with_the_seed():
    data = _examples(500, 4)
    for kw in (dict(labels_per_client=2), dict(quantity_skew=1.0), dict(labels_per_client=2, quantity_skew=1.5)):
        assert partition_task(data, 4, seed=7, max_samples=None, **kw) == partition_task(data, 4, seed=7,
                                                                                       max_samples=None, **kw)
        assert partition_task(data, 4, seed=7, max_samples=None, **kw) != partition_task(data, 4, seed=8,
                                                                                       max_samples=None, **kw)


def test_quantity_sizes_follow_the_rank_power_law():
    rng = np.random.default_rng(0)
    # 992 examples beyond the minimum of 2 each, shared 1 : 1/2 : 1/3 : 1/4 (sum 25/12): 476.16, 238.08, 158.72,
    # 119.04 -> floors 476, 238, 158, 119 (991); the one left goes to the largest remainder (158.72)
    assert sorted(quantity_sizes(1000, 4, 1.0, None, rng), reverse=True) == [478, 240, 161, 121]
    # with a cap the largest holds it and rank k holds cap * k**-a (round half up), at least 2
    assert sorted(quantity_sizes(1000, 4, 1.0, 100, rng), reverse=True) == [100, 50, 33, 25]
    assert sorted(quantity_sizes(1000, 4, 3.0, 100, rng), reverse=True) == [100, 13, 4, 2]
    # a cap the data cannot fill: the power law over what there is
    assert sorted(quantity_sizes(100, 4, 1.0, 90, rng), reverse=True) == [46, 24, 17, 13]
    steep = quantity_sizes(60, 10, 4.0, None, rng)
    assert steep.sum() == 60 and steep.min() == 2  # every client keeps a minimal shard


def test_quantity_skew_partition_conserves_rows_and_takes_the_sizes():
    data = _examples(1000, 2)
    parts = partition_task(data, 4, seed=1, max_samples=None, quantity_skew=1.0)
    assert sorted((len(tr) + len(va) for tr, va in parts), reverse=True) == [478, 240, 161, 121]
    assert len(set(_rows(parts))) == 1000  # disjoint and covering
    assert [len(va) for tr, va in parts] == [max(1, round(0.1 * (len(tr) + len(va)))) for tr, va in parts]
    capped = partition_task(data, 4, seed=1, max_samples=100, quantity_skew=1.0)
    assert sorted((len(tr) + len(va) for tr, va in capped), reverse=True) == [100, 50, 33, 25]
    assert len(set(_rows(capped))) == 208


def test_pathological_and_quantity_skew_compose():
    data = _examples(1200, 4)
    parts = partition_task(data, 4, seed=2, max_samples=None, labels_per_client=2, quantity_skew=2.0)
    assert all(len(s) == 2 for s in _label_sets(parts))
    assert len(set(_rows(parts))) == len(_rows(parts))  # no row in two shards
    # each client holds at most its power-law size (1 : 1/4 : 1/9 : 1/16 of the 1192 beyond the minimum)
    assert all(a <= b for a, b in zip(sorted(len(tr) + len(va) for tr, va in parts),
                                      sorted(quantity_sizes(1200, 4, 2.0, None, np.random.default_rng(0)))))
    one_holder = partition_task(data, 4, seed=2, max_samples=60, labels_per_client=1, quantity_skew=1.0)
    assert sorted((len(tr) + len(va) for tr, va in one_holder), reverse=True) == [60, 30, 20, 15]


def test_a_cap_keeps_every_label_of_a_client():
    data = [Example(f"t{i}", None, 0 if i < 290 else 1 + i % 2) for i in range(300)]  # label 0 dominates
    parts = partition_task(data, 2, seed=4, max_samples=5, labels_per_client=3)
    assert _label_sets(parts) == [{0, 1, 2}] * 2
    assert [len(tr) + len(va) for tr, va in parts] == [5, 5]


def test_impossible_skews_fail_with_one_line():
    data = _examples(100, 2)
    with pytest.raises(AtlasError, match="--labels-per-client 3 exceeds the 2 labels"):
        partition_task(data, 2, seed=0, max_samples=None, labels_per_client=3)
    with pytest.raises(AtlasError, match="drop --labels-per-client and --quantity-skew, or drop --dirichlet-alpha"):
        partition_task(data, 2, seed=0, max_samples=None, labels_per_client=1, dirichlet_alpha=0.5)
    with pytest.raises(AtlasError, match="label 1 has 1 training examples for the 2 clients"):
        partition_task([*_examples(20, 1), Example("x", None, 1)], 4, seed=0, max_samples=None, labels_per_client=1)
    with pytest.raises(AtlasError, match="--max-samples 2 is below the 3 labels"):
        partition_task(_examples(300, 3), 2, seed=0, max_samples=2, labels_per_client=3)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(labels_per_client=3), "--labels-per-client 3 exceeds the 2 labels of task gen_sentiment"),
    (dict(labels_per_client=1, dirichlet_alpha=0.5), "two label skews; set one of them"),
    (dict(quantity_skew=1.0, dirichlet_alpha=0.5), "drop --quantity-skew or --dirichlet-alpha"),
])
def test_config_refuses_impossible_combinations(tmp_path, overrides, message):
    with pytest.raises(AtlasError, match=message):
        tiny_config(tmp_path, **overrides)


def test_personal_rows_follow_a_pathological_mix():
    train = [Example(f"tr{i}", None, i % 3) for i in range(300)]
    test = [Example(f"te{i}", None, i % 3) for i in range(90)]
    shards = make_shards([TaskData("t", 3, "accuracy", train, test)], 3, seed=1, max_samples=None,
                         labels_per_client=1)
    for s in shards:
        (own,) = {ex.label for ex in s.train + s.val}
        assert len(s.personal) == 30 and {test[i].label for i in s.personal} == {own}  # its label's rows only


def test_a_client_cuts_its_skewed_shard_from_its_id_alone(tmp_path):
    cfg = tiny_config(tmp_path, tasks=("gen_topic",), clients_per_task=3, max_samples=30, max_test_samples=None,
                      labels_per_client=2, quantity_skew=1.0)
    task = load_task("gen_topic", max_test=cfg.max_test_samples)
    shards = make_shards([task], 3, seed=cfg.seed, max_samples=30, labels_per_client=2, quantity_skew=1.0,
                         val_fraction=cfg.val_fraction)
    for s in shards:
        alone, _ = load_client_data(cfg, s.client_id)
        assert alone == s and len({ex.label for ex in s.train + s.val}) == 2
