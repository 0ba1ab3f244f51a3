"""Datasets, the fixed test split, the public shared set and client partitioners."""

from secfl.data.datasets import Dataset, load_csv, load_idx, load_npz, read_idx
from secfl.data.federated import FederatedData, build_federated_data, load_dataset
from secfl.data.partition import (
    class_counts,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    partition_shards,
)

__all__ = [
    "Dataset",
    "FederatedData",
    "build_federated_data",
    "class_counts",
    "load_csv",
    "load_dataset",
    "load_idx",
    "load_npz",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "partition_shards",
    "read_idx",
]
