"""Build the federation's data: fixed test split, public shared set, client partitions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secfl.config import DataConfig
from secfl.data import datasets
from secfl.data.datasets import Dataset
from secfl.data.partition import (
    class_counts,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    partition_shards,
)
from secfl.errors import DataError
from secfl.randomness import Randomness

TEST_FRACTION = 0.3
#: The test split never depends on the run seed: every seed evaluates on the same records.
TEST_SPLIT_SEED = 20240229


@dataclass(frozen=True, eq=False)
class FederatedData:
    test: Dataset
    shared: Dataset
    clients: list[Dataset]
    #: (clients, classes) label counts: the experimenter's view, never sent in secure modes.
    class_counts: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.test.input_shape


def load_dataset(config: DataConfig) -> Dataset:
    """The whole labelled pool named by ``config`` (no network access)."""
    if config.dataset == "digits":
        return datasets.load_digits()
    if config.dataset == "breast_cancer":
        return datasets.load_breast_cancer()
    if config.dataset == "mnist1d":
        cache = Path(config.cache_dir) if config.cache_dir else None
        return datasets.load_mnist1d(config.num_samples, cache_dir=cache)
    path = config.path or ""
    if config.dataset == "npz":
        return datasets.load_npz(path)
    if config.dataset == "csv":
        return datasets.load_csv(path, label_column=config.label_column)
    return datasets.load_idx(path, config.labels_path or "")


def stratified_test_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified 30% test split: (train indices, test indices)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(labels.size)
    try:
        train, test = train_test_split(
            index, test_size=TEST_FRACTION, stratify=labels, random_state=TEST_SPLIT_SEED
        )
    except ValueError as exc:
        raise DataError(f"cannot make a stratified 30% test split: {exc}") from exc
    return np.sort(train), np.sort(test)


def _take_shared(
    labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` records of every class for the public shared set: (shared, rest)."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size < per_class + 1:
            raise DataError(
                f"data.shared.per_class={per_class} leaves no training data for class {c} "
                f"({members.size} records)"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    shared = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(labels.size), shared, assume_unique=True)
    return shared, rest


def _standardise(pool: Dataset, shared: Dataset) -> Dataset:
    """Every feature (pixel, sample) standardised with statistics of the public shared set
    only; features constant on the shared set are only centred."""
    if len(shared) < 2:
        return pool
    flat = shared.x.reshape(len(shared), -1)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std[std < 1e-6] = 1.0
    x = (pool.x.reshape(len(pool), -1) - mean) / std
    return Dataset(pool.name, x.reshape(pool.x.shape).astype(np.float32), pool.y, pool.num_classes)


def build_federated_data(config: DataConfig, randomness: Randomness) -> FederatedData:
    pool = load_dataset(config)
    train_idx, test_idx = stratified_test_split(pool.y)
    shared_rng = randomness.stream("data.shared").numpy_generator()
    shared_rel, rest_rel = _take_shared(
        pool.y[train_idx], config.shared.per_class, pool.num_classes, shared_rng
    )
    shared_idx, client_idx = train_idx[shared_rel], train_idx[rest_rel]
    tabular = len(pool.input_shape) == 1
    if config.standardize == "shared" or (config.standardize == "auto" and tabular):
        pool = _standardise(pool, pool.subset(shared_idx))
    labels = pool.y[client_idx]
    rng = randomness.stream("data.partition").numpy_generator()
    spec = config.partition
    n = config.num_clients
    if spec.kind == "iid":
        parts = partition_iid(labels, n, rng)
    elif spec.kind == "dirichlet":
        parts = partition_dirichlet(labels, n, rng, alpha=spec.alpha, min_samples=spec.min_samples)
    elif spec.kind == "shards":
        parts = partition_shards(labels, n, rng, classes_per_client=spec.classes_per_client)
    else:
        parts = partition_quantity(labels, n, rng, alpha=spec.alpha, min_samples=spec.min_samples)
    clients = [pool.subset(client_idx[p]) for p in parts]
    return FederatedData(
        test=pool.subset(test_idx),
        shared=pool.subset(shared_idx),
        clients=clients,
        class_counts=class_counts(labels, parts, pool.num_classes),
        num_classes=pool.num_classes,
    )
