"""Client sampling and the simulated clock (federation.cohort): seeded cohorts, dropouts, the deadline and
first-m rule on constructed times, the clock's arithmetic, and a server that aggregates only the clients taking
part."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from atlasfl.federation.cohort import (
    DROPPED,
    NOT_SAMPLED,
    STRAGGLER,
    SURPLUS,
    client_seconds,
    cohort,
    dropouts,
    participation,
    payload_sizes,
    replies,
)
from atlasfl.phases.devices import PROFILES, REFERENCE_FLOPS, simulated_seconds
from tests.unit.test_server import MODULES, _adopt, _server, _state


def test_a_cohort_is_a_seeded_uniform_draw_that_repeats():
    clients = list(range(100))
    first = cohort(3, 42, clients, 10)
    assert first == cohort(3, 42, clients, 10) == cohort(3, 42, clients[::-1], 10)  # order of the roster is moot
    assert len(first) == len(set(first)) == 10 and set(first) <= set(clients)
    assert first != cohort(4, 42, clients, 10) and first != cohort(3, 43, clients, 10)
    assert cohort(3, 42, clients, None) == clients  # no sampling: everyone
    assert len(cohort(3, 42, clients, 10, over_select=0.25)) == math.ceil(10 * 1.25) == 13
    assert cohort(1, 0, [0, 1, 2], 2, over_select=1.0) == [0, 1, 2]  # never more than the population
    # uniform: over many rounds every client is drawn about m/N of the time
    counts = np.bincount([c for r in range(2000) for c in cohort(r, 7, list(range(20)), 5)], minlength=20)
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500


def test_dropouts_are_seeded_and_follow_the_rate():
    sampled = list(range(1000))
    assert dropouts(5, 1, sampled, 0.0) == set()
    dropped = dropouts(5, 1, sampled, 0.3)
    assert dropped == dropouts(5, 1, sampled, 0.3) and 250 < len(dropped) < 350
    assert dropped != dropouts(6, 1, sampled, 0.3)


def test_the_deadline_drops_stragglers_and_the_first_m_replies_are_kept():
    seconds = {0: 5.0, 1: 1.0, 2: 3.0, 3: 12.0, 4: 3.0}
    kept, left, round_s = replies(seconds, m=3, deadline=10.0)
    assert kept == [1, 2, 4] and left == {0: SURPLUS, 3: STRAGGLER} and round_s == 3.0  # done at the 3rd reply
    kept, left, round_s = replies(seconds, m=3, deadline=4.0)
    assert kept == [1, 2, 4] and left == {0: STRAGGLER, 3: STRAGGLER} and round_s == 3.0
    kept, left, round_s = replies(seconds, m=4, deadline=4.0)  # only 3 in time: the server waits to the deadline
    assert kept == [1, 2, 4] and round_s == 4.0
    assert replies(seconds, m=None, deadline=None) == ([0, 1, 2, 3, 4], {}, 12.0)  # the slowest decides
    assert replies({2: 3.0, 1: 3.0}, m=1, deadline=None)[:2] == ([1], {2: SURPLUS})  # ties: by client id


def test_the_clock_is_flops_at_the_compute_rate_plus_bytes_at_the_bandwidth():
    tablet = PROFILES["tablet_4gb"]  # 0.15 x the reference, 25 Mbit/s
    s = simulated_seconds(tablet, params=1_000_000, tokens=5_000, bytes_down=1_000_000, bytes_up=250_000)
    assert s == pytest.approx(4 * 1e6 * 5e3 / (0.15 * REFERENCE_FLOPS) + 8 * 1.25e6 / 25e6, rel=1e-12)
    sizes = payload_sizes({"m": 4}, {"m": (30, 20)}, head=66)  # shapes are (d_out, d_in)
    assert sizes == dict(lora_A=4 * 20, lora_B=30 * 4, head=66)
    both = client_seconds(device="tablet_4gb", params=10, tokens=0, sizes=sizes, uploads=("lora_B",),
                          downloads=("lora_A", "lora_B", "head"), itemsize=2)
    assert both == pytest.approx(8 * 2 * (120 + 266) / 25e6, rel=1e-12)
    owed = client_seconds(device="tablet_4gb", params=10, tokens=0, sizes=sizes, uploads=("lora_B",),
                          downloads=("lora_A", "lora_B", "head"), itemsize=2, missed=1000)
    assert owed == pytest.approx(8 * 2 * (120 + 266 + 1000) / 25e6, rel=1e-12)  # what it missed comes down first


def test_participation_keeps_who_beats_the_deadline_and_labels_the_rest():
    cfg = SimpleNamespace(seed=0, clients_per_round=3, over_select=1.0, dropout_rate=None, round_deadline=2.5)
    times = {c: float(c) for c in range(10)}
    part = participation(cfg, 1, list(range(10)), times.__getitem__)
    sampled = cohort(1, 0, list(range(10)), 3, over_select=1.0)
    assert sorted(part.seconds) == sampled and len(sampled) == 6
    on_time = [c for c in sampled if c <= 2.5]
    assert part.participants == on_time[:3]
    for c in range(10):
        why = part.left_out.get(c)
        if c not in sampled:
            assert why == NOT_SAMPLED
        elif c > 2.5:
            assert why == STRAGGLER
        elif c not in part.participants:
            assert why == SURPLUS
    record = part.record()
    assert record["deadline_s"] == 2.5 and set(record["clients_s"]) == {str(c) for c in sampled}
    assert NOT_SAMPLED not in record["left_out"].values()
    cfg.dropout_rate, cfg.round_deadline = 0.5, None
    part = participation(cfg, 1, list(range(10)), times.__getitem__)
    dropped = dropouts(1, 0, sampled, 0.5)
    assert dropped and {c for c, why in part.left_out.items() if why == DROPPED} == dropped
    assert not set(part.participants) & dropped


def test_the_aggregate_weights_only_the_clients_that_took_part():
    F = np.vstack([np.eye(3), -np.eye(3)])
    ranks = {m: 4 for m in MODULES}
    server = _adopt(_server("fedavg_cluster", None), [0, 0, 0, 1, 1, 1], F, dict.fromkeys(range(6), ranks))
    uploads = {c: _state(c, ranks) for c in (0, 2)}
    out = server.aggregate(uploads, absent=frozenset({1, 3, 4, 5}))
    assert sorted(out) == [0, 2]  # the absent get nothing now; cluster {3, 4, 5}, with nobody taking part, is left
    assert list(server.missed) == [1]  # client 1 is owed its group's model (tests/unit/test_catch_up.py)
    for key in uploads[0]:
        mean = (uploads[0][key] + uploads[2][key]) / 2  # equal shards: client 1's state plays no part
        assert torch.allclose(out[0][key], mean) and torch.allclose(out[2][key], mean)
    with pytest.raises(ValueError, match="no upload"):
        server.aggregate(uploads, absent=frozenset({3, 4, 5}))  # client 1 takes part: its upload is needed


def test_bad_sampling_settings_are_one_line_errors():
    from atlasfl.config import build_config
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="--over-select .* --clients-per-round"):
        build_config("tiny-bert", 0, "atlas", tasks=("gen_sentiment",), clients_per_task=4, over_select=0.5)
    with pytest.raises(AtlasError, match="--clients-per-round 5 exceeds the run's 4 clients"):
        build_config("tiny-bert", 0, "atlas", tasks=("gen_sentiment",), clients_per_task=4, clients_per_round=5)
    cfg = build_config("tiny-bert", 0, "atlas", tasks=("gen_sentiment",), clients_per_task=4, clients_per_round=2,
                       over_select=0.5, round_deadline=3.0, dropout_rate=0.1)
    assert cfg.run_name.endswith("_m2_os0.5_dl3_do0.1")
