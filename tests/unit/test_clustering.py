import warnings

import numpy as np
import pytest

from atlasfl.phases.clustering import adjusted_rand, canonical_labels, cluster_fingerprints

TRUTH = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def grouped(seed, noise=0.1, groups=4, per_group=3, d=64):
    """A large component shared by everyone plus one offset per group: what text fingerprints look like."""
    rng = np.random.default_rng(seed)
    common = 10 * rng.normal(size=d)
    offsets = rng.normal(size=(groups, d))
    return common + np.repeat(offsets, per_group, axis=0) + noise * rng.normal(size=(groups * per_group, d))


@pytest.mark.parametrize("seed", [0, 42, 123, 456])
def test_separated_groups_recovered(seed):
    result = cluster_fingerprints(grouped(seed), seed=seed)
    assert result.k == 4
    assert result.method == "kmeans:silhouette"
    assert adjusted_rand(result.labels, TRUTH) == 1.0
    assert result.labels == TRUTH  # canonical: groups numbered in order of first appearance
    assert result.silhouette == result.silhouette_by_k[4] > 0.5
    assert np.array(result.similarity).shape == (12, 12)


def test_labels_canonical_under_shuffling():
    F = grouped(1)
    order = np.random.default_rng(0).permutation(12)
    result = cluster_fingerprints(F[order], seed=1)
    assert result.labels == canonical_labels([TRUTH[i] for i in order])
    assert result.labels[0] == 0


def test_canonical_labels():
    assert canonical_labels([3, 3, 1, 0, 1]) == [0, 0, 1, 2, 1]


def test_one_group_gives_k1_by_dispersion():
    rng = np.random.default_rng(3)
    F = 10 * rng.normal(size=64) + 0.01 * rng.normal(size=(12, 64))
    result = cluster_fingerprints(F, seed=3)
    assert (result.k, result.labels, result.silhouette) == (1, [0] * 12, None)
    assert result.method == "single:dispersion"
    assert result.dispersion < 0.05


def test_structureless_spread_gives_k1_by_silhouette():
    F = np.random.default_rng(4).normal(size=(12, 64))  # far apart, but no groups
    result = cluster_fingerprints(F, seed=4)
    assert result.k == 1 and result.method == "single:silhouette"
    assert max(result.silhouette_by_k.values()) < 0.2


def test_identical_fingerprints_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cluster_fingerprints(np.ones((5, 8)), seed=0)
    assert result.k == 1 and result.labels == [0] * 5


@pytest.mark.parametrize("num_clients", [1, 2])
def test_few_clients(num_clients):
    result = cluster_fingerprints(np.random.default_rng(0).normal(size=(num_clients, 8)), seed=0)
    assert result.k == 1 and result.labels == [0] * num_clients
    assert result.method == "single:few-clients"


def test_deterministic_given_seed():
    F = grouped(7, noise=0.8)
    a, b = cluster_fingerprints(F, seed=11), cluster_fingerprints(F, seed=11)
    assert a == b


def test_kmax_limits_the_search():
    result = cluster_fingerprints(grouped(0), seed=0, kmax=3)
    assert set(result.silhouette_by_k) == {2, 3}
    assert result.k <= 3


def test_adjusted_rand():
    assert adjusted_rand([1, 1, 0, 0], [0, 0, 1, 1]) == 1.0
    assert adjusted_rand([0, 0, 0, 0], [0, 0, 1, 1]) == 0.0


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        cluster_fingerprints(np.array([[np.nan, 1.0], [0.0, 1.0]]), seed=0)
    with pytest.raises(ValueError):
        cluster_fingerprints(np.zeros((0, 4)), seed=0)


def test_spread_within_sampling_noise_is_one_cluster_and_beyond_it_is_not():
    rng = np.random.default_rng(0)
    noise_var = 0.01  # per-client sampling variance (trace) of each fingerprint
    same = rng.normal(size=16) + rng.normal(scale=np.sqrt(noise_var / 16), size=(9, 16))
    one = cluster_fingerprints(same, seed=0, noise=noise_var)
    assert one.k == 1 and one.method == "single:noise" and one.spread_to_noise < 1.5
    centres = rng.normal(size=(3, 16))
    apart = np.repeat(centres, 3, axis=0) + rng.normal(scale=np.sqrt(noise_var / 16), size=(9, 16))
    three = cluster_fingerprints(apart, seed=0, noise=noise_var)
    assert three.k == 3 and three.method == "kmeans:noise-consistent" and three.spread_to_noise > 1.5
    assert three.tightness_by_k[3] <= 1.5 < three.tightness_by_k[2]
    assert adjusted_rand(three.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2]) == 1.0
