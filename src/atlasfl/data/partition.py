"""Split each task's training data into disjoint client shards, each with a local validation part."""

from dataclasses import dataclass

import numpy as np

from atlasfl.data.example import Example, stable_seed
from atlasfl.data.tasks import TaskData
from atlasfl.errors import AtlasError

DIRICHLET_TRIES = 100  # re-draws before giving up on a Dirichlet split that leaves a client near-empty


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
) -> list[tuple[list[Example], list[Example]]]:
    """Shuffle with `seed`, cut into `num_clients` disjoint shards (IID slices or Dirichlet label
    skew), cap each at `max_samples`, and hold out `val_fraction` of each shard: [(train, val)]."""
    n = len(train)
    if num_clients < 1:
        raise AtlasError(f"clients per task must be at least 1, got {num_clients}; raise --clients-per-task")
    if max_samples is not None and max_samples < 2:
        raise AtlasError(f"max samples per client must be at least 2, got {max_samples}; raise --max-samples")
    if not 0 <= val_fraction < 1:
        raise AtlasError(f"val fraction must be in [0, 1), got {val_fraction}")
    if n < 2 * num_clients:
        raise AtlasError(f"{n} training examples are too few for {num_clients} clients; lower --clients-per-task")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if dirichlet_alpha is None:
        parts = np.array_split(order, num_clients)  # equal contiguous slices of a seeded permutation
    else:
        parts = _dirichlet_parts(order, np.array([ex.label for ex in train]), num_clients, dirichlet_alpha, rng)
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


def make_shards(
    tasks: list[TaskData],
    clients_per_task: int,
    *,
    seed: int,
    max_samples: int | None,
    dirichlet_alpha: float | None = None,
    val_fraction: float = 0.1,
) -> list[ClientShard]:
    """Client ids run over tasks in order: task 0 gets 0..c-1, task 1 gets c..2c-1, ..."""
    shards = []
    for i, task in enumerate(tasks):
        shards += task_shards(task, clients_per_task, first_id=i * clients_per_task, seed=seed,
                              max_samples=max_samples, dirichlet_alpha=dirichlet_alpha, val_fraction=val_fraction)
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
) -> list[ClientShard]:
    """One task's shards, ids from `first_id`, each with its personal test rows. Seeded by run seed, task
    name (and client id) only, so a machine that holds one task cuts exactly the shards the in-process
    engine cuts."""
    test_labels = [ex.label for ex in task.test]
    try:
        parts = partition_task(
            task.train, clients_per_task, seed=stable_seed(seed, task.name),  # tasks shuffle differently
            max_samples=max_samples, dirichlet_alpha=dirichlet_alpha, val_fraction=val_fraction,
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
                         f"with label counts {available.tolist()}; raise --max-test-samples or --dirichlet-alpha")
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(test == label), size=k, replace=False) for label, k in enumerate(wanted) if k]
    return tuple(sorted(int(i) for i in np.concatenate(rows)))
