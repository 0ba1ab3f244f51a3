"""Datasets: bundled, generated (no network), user files, the fixed split and shared set."""

from __future__ import annotations

import gzip
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from secfl.config import DataConfig
from secfl.data import build_federated_data, load_csv, load_idx, load_npz, read_idx
from secfl.data.datasets import load_breast_cancer, load_digits, load_mnist1d
from secfl.data.federated import stratified_test_split
from secfl.errors import DataError
from secfl.randomness import Randomness


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_bundled_and_generated_data_load_without_network(no_network: None, tmp_path: Path) -> None:
    digits = load_digits()
    assert digits.x.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert digits.x.min() >= 0.0 and digits.x.max() <= 1.0
    cancer = load_breast_cancer()
    assert cancer.x.shape == (569, 30) and cancer.num_classes == 2
    signals = load_mnist1d(500, cache_dir=tmp_path)
    assert signals.x.shape == (500, 1, 40) and set(np.unique(signals.y)) == set(range(10))


def test_mnist1d_cache_is_keyed_by_arguments_and_leaves_global_rng(tmp_path: Path) -> None:
    state = np.random.get_state()[1].copy()
    first = load_mnist1d(300, cache_dir=tmp_path)
    assert np.array_equal(np.random.get_state()[1], state)
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    again = load_mnist1d(300, cache_dir=tmp_path)
    assert np.array_equal(first.x, again.x)
    load_mnist1d(400, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2


def test_test_split_is_fixed_stratified_30_percent() -> None:
    y = load_digits().y
    train, test = stratified_test_split(y)
    assert abs(test.size / y.size - 0.3) < 0.01
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == y.size
    share_all = np.bincount(y) / y.size
    share_test = np.bincount(y[test]) / test.size
    assert np.abs(share_all - share_test).max() < 0.01
    assert np.array_equal(test, stratified_test_split(y)[1])


def test_federation_shared_set_is_public_and_removed_from_clients() -> None:
    config = DataConfig(num_clients=6)
    for seed in (0, 1):
        fed = build_federated_data(config, Randomness("seeded", seed))
        assert np.bincount(fed.shared.y, minlength=10).tolist() == [5] * 10
        assert len(fed.test) == 540
        total = len(fed.test) + len(fed.shared) + sum(len(c) for c in fed.clients)
        assert total == 1797
        rows = {r.tobytes() for r in fed.shared.x.reshape(len(fed.shared), -1)}
        for client in fed.clients:
            assert not rows & {r.tobytes() for r in client.x.reshape(len(client), -1)}
        assert fed.class_counts.sum() == sum(len(c) for c in fed.clients)
    # the test split does not depend on the run seed
    a = build_federated_data(config, Randomness("seeded", 0)).test
    b = build_federated_data(config, Randomness("seeded", 7)).test
    assert np.array_equal(a.x, b.x)


def test_npz_loader(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(40, dtype=np.float64).reshape(10, 4), y=np.array([3, 7] * 5))
    data = load_npz(path)
    assert data.x.dtype == np.float32 and data.x.shape == (10, 4)
    assert data.y.tolist() == [0, 1] * 5 and data.num_classes == 2
    np.savez(tmp_path / "bad.npz", features=np.zeros(3))
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_npz(tmp_path / "bad.npz")


def test_csv_loader_with_header_and_label_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,label,b\n1.0,0,2.0\n3.0,1,4.0\n5.0,1,6.0\n")
    data = load_csv(path, label_column=1)
    assert data.x.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert data.y.tolist() == [0, 1, 1]
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(DataError, match="row 2"):
        load_csv(tmp_path / "bad.csv")


def _write_idx(path: Path, array: np.ndarray, code: int, gz: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if gz else body)


def test_idx_loader(tmp_path: Path) -> None:
    images = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    labels = np.array([0, 1, 2, 1], dtype=np.uint8)
    _write_idx(tmp_path / "img.idx", images, 0x08)
    _write_idx(tmp_path / "lab.idx.gz", labels, 0x08, gz=True)
    data = load_idx(tmp_path / "img.idx", tmp_path / "lab.idx.gz")
    assert data.x.shape == (4, 1, 3, 3)
    assert np.allclose(data.x[0, 0], images[0] / 255.0)
    assert data.y.tolist() == [0, 1, 2, 1]
    (tmp_path / "trunc.idx").write_bytes((tmp_path / "img.idx").read_bytes()[:-3])
    with pytest.raises(DataError, match="body has"):
        read_idx(tmp_path / "trunc.idx")
    (tmp_path / "junk.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(tmp_path / "junk.idx")


def test_images_standardised_with_shared_statistics_only() -> None:
    from pydantic import ValidationError

    from secfl.randomness import Randomness

    config = DataConfig(dataset="digits", num_clients=4, standardize="shared")
    data = build_federated_data(config, Randomness("seeded", 0))
    raw = build_federated_data(DataConfig(dataset="digits", num_clients=4), Randomness("seeded", 0))
    assert data.shared.x.shape == raw.shared.x.shape and data.shared.x.ndim == 4
    flat = data.shared.x.reshape(len(data.shared), -1).astype(np.float64)
    varying = raw.shared.x.reshape(len(raw.shared), -1).std(axis=0) > 1e-6
    # the shared set is exactly centred and scaled; client and test data use its statistics
    assert np.allclose(flat.mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(flat.std(axis=0)[varying], 1.0, atol=1e-4)
    mean = raw.shared.x.reshape(len(raw.shared), -1).mean(axis=0)
    std = raw.shared.x.reshape(len(raw.shared), -1).std(axis=0)
    std[std < 1e-6] = 1.0
    expected = (raw.test.x.reshape(len(raw.test), -1) - mean) / std
    assert np.allclose(data.test.x.reshape(len(data.test), -1), expected, atol=1e-5)
    # default: images as loaded
    assert raw.test.x.min() >= 0.0 and raw.test.x.max() <= 1.0
    with pytest.raises(ValidationError, match="needs data.shared.per_class >= 1"):
        DataConfig(dataset="digits", standardize="shared", shared={"per_class": 0})
