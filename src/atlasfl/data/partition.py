"""Split each task's training data into disjoint client shards, each with a local validation part."""

from dataclasses import dataclass

import numpy as np

from atlasfl.data.example import Example, stable_seed
from atlasfl.data.tasks import TaskData
from atlasfl.errors import AtlasError

DIRICHLET_TRIES = 100  # re-draws before giving up on a Dirichlet split that leaves a client near-empty
MIN_SHARD = 2  # the fewest examples a client may hold: one to train on, one to validate on


@dataclass(frozen=True)
class ClientShard:
    client_id: int
    task: str
    train: list[Example]
    val: list[Example]  # val_fraction (seeded) of the client's shard, at least 1 example
    personal: tuple[int, ...] = ()  # rows of the task's test set that form the client's personal test set


def partition_task(
    train: list[Example],
    num_clients: int,
    *,
    seed: int,
    max_samples: int | None,
    dirichlet_alpha: float | None = None,
    val_fraction: float = 0.1,
    labels_per_client: int | None = None,
    quantity_skew: float | None = None,
) -> list[tuple[list[Example], list[Example]]]:
    """Shuffle with `seed`, cut into `num_clients` disjoint shards (IID slices, Dirichlet label skew, or
    `labels_per_client` labels each), of equal sizes or, with `quantity_skew`, of power-law sizes
    (`quantity_sizes`); cap each at `max_samples`, and hold out `val_fraction` of each shard: [(train, val)]."""
    n = len(train)
    if num_clients < 1:
        raise AtlasError(f"clients per task must be at least 1, got {num_clients}; raise --clients-per-task")
    if max_samples is not None and max_samples < 2:
        raise AtlasError(f"max samples per client must be at least 2, got {max_samples}; raise --max-samples")
    if not 0 <= val_fraction < 1:
        raise AtlasError(f"val fraction must be in [0, 1), got {val_fraction}")
    if n < MIN_SHARD * num_clients:
        raise AtlasError(f"{n} training examples are too few for {num_clients} clients; lower --clients-per-task")
    if dirichlet_alpha is not None and (labels_per_client is not None or quantity_skew is not None):
        raise AtlasError("--dirichlet-alpha draws both the label mix and the sizes of the shards; drop "
                         "--labels-per-client and --quantity-skew, or drop --dirichlet-alpha")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    labels = np.array([ex.label for ex in train])
    sizes = None if quantity_skew is None else quantity_sizes(n, num_clients, quantity_skew, max_samples, rng)
    if dirichlet_alpha is not None:
        parts = _dirichlet_parts(order, labels, num_clients, dirichlet_alpha, rng)
    elif labels_per_client is not None:
        parts = _pathological_parts(order, labels, num_clients, labels_per_client, sizes, rng)
        caps = [max_samples] * num_clients if sizes is None else sizes  # power-law sizes are capped already
        parts = [_cap_keeping_labels(part, labels, cap) for part, cap in zip(parts, caps)]
    elif sizes is not None:
        parts = np.split(order[:sizes.sum()], np.cumsum(sizes)[:-1])  # power-law slices of a seeded permutation
    else:
        parts = np.array_split(order, num_clients)  # equal contiguous slices of a seeded permutation
    out = []
    for part in parts:
        shard = [train[i] for i in part[:max_samples]]  # parts are in random order: the cap is a random subset
        n_val = max(1, round(val_fraction * len(shard)))
        out.append((shard[n_val:], shard[:n_val]))
    return out


def _dirichlet_parts(order, labels, num_clients: int, alpha: float, rng) -> list[np.ndarray]:
    """Per label, give clients proportions ~ Dir(alpha); re-draw until every client has >= 2."""
    if alpha <= 0:
        raise AtlasError(f"--dirichlet-alpha must be positive, got {alpha}")
    for _ in range(DIRICHLET_TRIES):
        parts = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            idx = order[labels[order] == label]
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk)
        if min(map(len, parts)) >= 2:
            return [rng.permutation(part) for part in parts]  # mix labels so the cap keeps the skew
    raise AtlasError(
        f"a Dirichlet split with alpha={alpha} kept leaving a client with < 2 of {len(order)} examples; "
        "raise --dirichlet-alpha or lower --clients-per-task"
    )


def quantity_sizes(n: int, num_clients: int, exponent: float, cap: int | None, rng) -> np.ndarray:
    """Shard sizes by a power law of rank (Zipf): the client of rank k (1 = largest) holds in proportion to
    k**-exponent, at least MIN_SHARD. Without a cap the sizes add up to all `n` examples (largest remainders);
    with one, the largest shard is `cap` and rank k's is cap * k**-exponent, scaled down to the `n` there are
    if they do not suffice. Which client has which rank is a seeded permutation."""
    if exponent <= 0:
        raise AtlasError(f"--quantity-skew must be positive, got {exponent}; leave it out for equal shards")
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -exponent
    capped = None if cap is None else np.maximum(MIN_SHARD, np.floor(cap * weights + 0.5).astype(np.int64))
    if capped is not None and capped.sum() <= n:
        sizes = capped
    else:
        sizes = MIN_SHARD + _largest_remainders((n - MIN_SHARD * num_clients) * weights / weights.sum())
    return rng.permutation(sizes)


def _largest_remainders(shares: np.ndarray) -> np.ndarray:
    """Whole numbers adding up to round(sum(shares)), each the floor of its share or one more (the
    largest fractional parts get the extra ones; the first on ties)."""
    floors = np.floor(shares).astype(np.int64)
    extra = int(round(shares.sum())) - int(floors.sum())
    floors[np.argsort(-(shares - floors), kind="stable")[:extra]] += 1
    return floors


def _pathological_parts(order, labels, num_clients: int, per_client: int, sizes, rng) -> list[np.ndarray]:
    """Each client holds exactly `per_client` labels: a seeded permutation of the labels is dealt out in
    turn (client i gets the next `per_client` of it, wrapping around), so every label has a holder when
    num_clients * per_client >= the labels (the rows of a label nobody holds are left out) and the holders
    are spread evenly. Each label's rows go to its holders in proportion to their `sizes` (equal without
    quantity skew), at least one each; the caller then cuts each client to its size."""
    present = np.unique(labels)
    if per_client < 1:
        raise AtlasError(f"--labels-per-client must be at least 1, got {per_client}")
    if per_client > len(present):
        raise AtlasError(f"--labels-per-client {per_client} exceeds the {len(present)} labels of the training "
                         f"data; lower it to at most {len(present)}")
    deck = rng.permutation(present)
    held = [deck[(np.arange(per_client) + i * per_client) % len(present)] for i in range(num_clients)]
    weights = np.ones(num_clients) if sizes is None else np.asarray(sizes, dtype=np.float64)
    parts = [[] for _ in range(num_clients)]
    for label in present:
        holders = [i for i in range(num_clients) if label in held[i]]
        idx = order[labels[order] == label]
        if not holders:
            continue
        if len(idx) < len(holders):
            raise AtlasError(f"label {label} has {len(idx)} training examples for the {len(holders)} clients that "
                             "hold it; lower --clients-per-task or raise --labels-per-client")
        w = weights[holders]
        counts = 1 + _largest_remainders((len(idx) - len(holders)) * w / w.sum())
        for i, chunk in zip(holders, np.split(idx, np.cumsum(counts)[:-1])):
            parts[i].extend(chunk)
    small = [i for i, part in enumerate(parts) if len(part) < MIN_SHARD]
    if small:
        raise AtlasError(f"client(s) {small} got fewer than {MIN_SHARD} examples of their labels; lower "
                         "--clients-per-task or raise --labels-per-client")
    return [rng.permutation(part) for part in parts]  # mix labels so the validation cut takes every label


def _cap_keeping_labels(part: np.ndarray, labels: np.ndarray, cap: int | None) -> np.ndarray:
    """At most `cap` of a shard's rows (in its order), each of its labels kept with its share of the cap
    (largest remainders), at least one row each, so a cap never changes which labels a client holds."""
    if cap is None or len(part) <= cap:
        return part
    present, counts = np.unique(labels[part], return_counts=True)
    if cap < len(present):
        raise AtlasError(f"--max-samples {cap} is below the {len(present)} labels a client holds; raise "
                         "--max-samples or lower --labels-per-client")
    keep = dict(zip(present, 1 + _largest_remainders((cap - len(present)) * counts / counts.sum())))
    taken = dict.fromkeys(present, 0)
    out = []
    for i in part:
        if taken[labels[i]] < keep[labels[i]]:
            taken[labels[i]] += 1
            out.append(i)
    return np.array(out, dtype=np.int64)


def make_shards(
    tasks: list[TaskData],
    clients_per_task: int,
    *,
    seed: int,
    max_samples: int | None,
    dirichlet_alpha: float | None = None,
    val_fraction: float = 0.1,
    labels_per_client: int | None = None,
    quantity_skew: float | None = None,
) -> list[ClientShard]:
    """Client ids run over tasks in order: task 0 gets 0..c-1, task 1 gets c..2c-1, ..."""
    shards = []
    for i, task in enumerate(tasks):
        shards += task_shards(task, clients_per_task, first_id=i * clients_per_task, seed=seed,
                              max_samples=max_samples, dirichlet_alpha=dirichlet_alpha, val_fraction=val_fraction,
                              labels_per_client=labels_per_client, quantity_skew=quantity_skew)
    return shards


def task_shards(
    task: TaskData,
    clients_per_task: int,
    *,
    first_id: int,
    seed: int,
    max_samples: int | None,
    dirichlet_alpha: float | None = None,
    val_fraction: float = 0.1,
    labels_per_client: int | None = None,
    quantity_skew: float | None = None,
) -> list[ClientShard]:
    """One task's shards, ids from `first_id`, each with its personal test rows. Seeded by run seed, task
    name (and client id) only, so a machine that holds one task cuts exactly the shards the in-process
    engine cuts."""
    test_labels = [ex.label for ex in task.test]
    try:
        parts = partition_task(
            task.train, clients_per_task, seed=stable_seed(seed, task.name),  # tasks shuffle differently
            max_samples=max_samples, dirichlet_alpha=dirichlet_alpha, val_fraction=val_fraction,
            labels_per_client=labels_per_client, quantity_skew=quantity_skew,
        )
        return [ClientShard(cid, task.name, train, val, personal_test_rows(
            [ex.label for ex in train + val], test_labels, task.num_labels, seed=stable_seed(seed, task.name, cid)))
            for cid, (train, val) in enumerate(parts, start=first_id)]
    except AtlasError as e:
        raise AtlasError(f"task {task.name}: {e}") from None


def personal_test_rows(shard_labels, test_labels, num_labels: int, *, seed: int) -> tuple[int, ...]:
    """Rows of the task's test set whose label mix follows the client's own (its shard's label
    proportions p_l): the largest n with round(p_l * n) <= the test rows of label l for every label,
    capped at the test size, then round(p_l * n) rows of each label drawn without replacement (seeded).
    A subset of the test set, so it shares no example with any training shard and costs no extra
    forward pass: the client's test predictions are indexed. Sorted row indices."""
    shard = np.bincount(np.asarray(shard_labels, dtype=np.int64), minlength=num_labels)
    test = np.asarray(test_labels, dtype=np.int64)
    if test.size == 0:
        raise AtlasError("the test set is empty, so no personal test set can be drawn; give the task test examples")
    available = np.bincount(test, minlength=num_labels)
    p = shard / shard.sum()
    sizes = np.arange(1, len(test) + 1)
    counts = np.floor(np.outer(sizes, p) + 0.5).astype(np.int64)  # round half up: monotone in n
    fits = np.flatnonzero((counts <= available).all(axis=1))
    wanted = counts[fits[-1]] if fits.size else np.zeros(num_labels, dtype=np.int64)
    if wanted.sum() == 0:
        raise AtlasError(f"no personal test set fits a client's label mix {np.round(p, 3).tolist()} in a test set "
                         f"with label counts {available.tolist()}; raise --max-test-samples, --dirichlet-alpha "
                         "or --labels-per-client")
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(test == label), size=k, replace=False) for label, k in enumerate(wanted) if k]
    return tuple(sorted(int(i) for i in np.concatenate(rows)))
