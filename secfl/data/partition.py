"""Partitioners: split a labelled pool across clients, deterministically for a generator.

Each returns one index array per client; together they are disjoint and cover the pool.
"""

from __future__ import annotations

import numpy as np

from secfl.errors import DataError

#: Tries at drawing a Dirichlet split that gives every client its minimum before giving up.
_MAX_DRAWS = 1000


def _check(num_samples: int, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise DataError(f"data.num_clients must be >= 1, got {num_clients}")
    if num_clients * min_samples > num_samples:
        raise DataError(
            f"cannot give {num_clients} clients at least {min_samples} samples each from "
            f"{num_samples} samples; lower data.num_clients or add data"
        )


def partition_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniformly shuffled, near-equal shares."""
    _check(labels.size, num_clients, 1)
    order = rng.permutation(labels.size)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_samples: int = 2,
) -> list[np.ndarray]:
    """Label skew: class c is split across clients in proportions ~ Dirichlet(alpha).

    Draws are repeated until every client holds at least ``min_samples`` samples.
    """
    if alpha <= 0:
        raise DataError(f"data.partition.alpha must be > 0, got {alpha}")
    _check(labels.size, num_clients, min_samples)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in merged) >= min_samples:
            return merged
    raise DataError(
        f"Dirichlet(alpha={alpha}) never gave all {num_clients} clients {min_samples} samples "
        f"in {_MAX_DRAWS} draws; raise alpha, lower min_samples or use fewer clients"
    )


def partition_shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, classes_per_client: int
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; a class is split evenly
    among the clients that hold it. Class holders are assigned round-robin over a shuffled
    class order, so every class has a holder when ``num_clients * k >= C``."""
    classes = np.unique(labels)
    k = classes_per_client
    if not 1 <= k <= classes.size:
        raise DataError(
            f"data.partition.classes_per_client must be in [1, {classes.size}], got {k}"
        )
    if num_clients * k < classes.size:
        raise DataError(
            f"shards: {num_clients} clients x {k} classes cannot cover {classes.size} classes; "
            "every sample must belong to a client"
        )
    _check(labels.size, num_clients, 1)
    ring = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(ring[(client * k + j) % classes.size])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        if members.size < len(owners):
            raise DataError(
                f"shards: class {c} has {members.size} samples for {len(owners)} holders"
            )
        for owner, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def partition_quantity(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_samples: int = 2,
) -> list[np.ndarray]:
    """Quantity skew: sizes ~ Dirichlet(alpha) over clients (at least ``min_samples``
    each), labels IID within a client."""
    if alpha <= 0:
        raise DataError(f"data.partition.alpha must be > 0, got {alpha}")
    _check(labels.size, num_clients, min_samples)
    spare = labels.size - num_clients * min_samples
    shares = rng.dirichlet(np.full(num_clients, alpha))
    extra = np.floor(shares * spare).astype(np.int64)
    extra[: spare - int(extra.sum())] += 1  # hand out the rounding remainder
    sizes = extra + min_samples
    order = rng.permutation(labels.size)
    return [np.sort(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The experimenter's view: a (clients, classes) matrix of label counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
