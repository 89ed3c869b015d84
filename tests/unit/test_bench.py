"""`atlas bench`'s table: each row's cells come from that loop's mean round costs."""
from __future__ import annotations

from atlasfl.bench import table_rows


def _cost(train_s, aggregate_s, evaluate_s, examples=64):
    work = dict(examples=examples, real_tokens=30 * examples, padded_tokens=40 * examples)
    return dict(train_s=train_s, aggregate_s=aggregate_s, evaluate_s=evaluate_s, train=work, evaluate=work)


def test_the_ratio_column_is_the_plain_loops_seconds_over_the_rows_own():
    clocks = {"plain loop": [_cost(2.0, 0.0, 1.0), _cost(4.0, 0.0, 1.0)],  # 4.0 s a round on average
              "atlas": [_cost(1.0, 0.3, 0.2), _cost(1.2, 0.3, 0.2)],  # 1.6 s
              "atlas + client batching": [_cost(6.0, 0.5, 1.5), _cost(6.0, 0.5, 1.5)]}  # 8.0 s
    rows = table_rows("tiny-bert", 4, clocks)
    assert [r[:3] for r in rows] == [["tiny-bert", "4", name] for name in clocks]
    assert [r[3:7] for r in rows] == [["3.0", "0.00", "1.0", "4.0"], ["1.1", "0.30", "0.2", "1.6"],
                                      ["6.0", "0.50", "1.5", "8.0"]]
    assert [r[-1] for r in rows] == ["1.00x", "2.50x", "0.50x"]  # 4.0 / 4.0, 4.0 / 1.6, 4.0 / 8.0
    assert rows[0][-2] == "25"  # padding %: 10 of every 40 token positions
