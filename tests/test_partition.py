"""Partitioners: disjoint, complete, skewed as configured, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest

from secfl.data import (
    class_counts,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    partition_shards,
)
from secfl.errors import DataError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 records, 10 balanced classes


def _check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "every record belongs to exactly one client"
    assert np.unique(joined).size == n, "no record is given twice"
    assert set(joined.tolist()) == set(range(n))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    "split",
    [
        lambda r: partition_iid(LABELS, 7, r),
        lambda r: partition_dirichlet(LABELS, 7, r, alpha=0.3, min_samples=5),
        lambda r: partition_shards(LABELS, 7, r, classes_per_client=2),
        lambda r: partition_quantity(LABELS, 7, r, alpha=0.5, min_samples=5),
    ],
    ids=["iid", "dirichlet", "shards", "quantity"],
)
def test_partitions_are_disjoint_complete_and_deterministic(split) -> None:  # type: ignore[no-untyped-def]
    parts = split(_rng(3))
    assert len(parts) == 7
    _check_exact_cover(parts, LABELS.size)
    again = split(_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split(_rng(4))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_balanced_and_labels_mixed() -> None:
    parts = partition_iid(LABELS, 10, _rng())
    assert {p.size for p in parts} == {100}
    counts = class_counts(LABELS, parts, 10)
    assert (counts > 0).sum(axis=1).min() >= 8  # every client sees most classes


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def skew(alpha: float) -> float:
        parts = partition_dirichlet(LABELS, 10, _rng(1), alpha=alpha, min_samples=2)
        counts = class_counts(LABELS, parts, 10).astype(float)
        shares = counts / counts.sum(axis=1, keepdims=True)
        return float(shares.max(axis=1).mean())  # mean dominant-class share

    low, high = skew(0.1), skew(100.0)
    assert low > 0.5 > high, (low, high)
    assert high < 0.2  # near-uniform at large alpha


def test_dirichlet_respects_min_samples() -> None:
    parts = partition_dirichlet(LABELS, 20, _rng(2), alpha=0.1, min_samples=10)
    assert min(p.size for p in parts) >= 10


def test_shards_give_exactly_k_classes() -> None:
    parts = partition_shards(LABELS, 10, _rng(), classes_per_client=3)
    counts = class_counts(LABELS, parts, 10)
    assert ((counts > 0).sum(axis=1) == 3).all()


def test_quantity_skew_varies_sizes_not_labels() -> None:
    parts = partition_quantity(LABELS, 10, _rng(5), alpha=0.3, min_samples=5)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 5
    assert sizes.max() > 3 * np.median(sizes) or sizes.max() > 2 * sizes.min()
    big = parts[int(sizes.argmax())]
    assert np.unique(LABELS[big]).size == 10


def test_impossible_partitions_are_errors() -> None:
    with pytest.raises(DataError, match="at least 200 samples"):
        partition_dirichlet(LABELS, 10, _rng(), alpha=1.0, min_samples=200)
    with pytest.raises(DataError, match="cannot cover"):
        partition_shards(LABELS, 2, _rng(), classes_per_client=2)
    with pytest.raises(DataError, match="classes_per_client"):
        partition_shards(LABELS, 10, _rng(), classes_per_client=11)
    with pytest.raises(DataError, match="alpha"):
        partition_quantity(LABELS, 10, _rng(), alpha=0.0)
