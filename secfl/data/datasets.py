"""Datasets: bundled (digits, breast cancer), generated (MNIST-1D) and user files.

Nothing here touches the network. MNIST-1D is generated with ``mnist1d.data.make_dataset``
(never ``get_dataset``, which downloads) and cached on disk under a hash of its arguments.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfl.errors import DataError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features ``x`` (float32, ``(n, *input_shape)``) and integer labels ``y`` in [0, C)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"dataset {self.name!r}: {self.x.shape[0]} inputs but {self.y.shape[0]} labels"
            )
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise DataError(f"dataset {self.name!r}: x must be float32 and y int64")
        if not np.isfinite(self.x).all():
            raise DataError(f"dataset {self.name!r}: inputs contain NaN or Inf")
        if self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise DataError(
                f"dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"got [{self.y.min()}, {self.y.max()}]"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.name, self.x[index], self.y[index], self.num_classes)


def _labels(raw: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Map arbitrary label values onto 0..C-1 (sorted order), so C is the number of values."""
    if raw.ndim != 1:
        raise DataError(f"dataset {name!r}: labels must be 1-D, got shape {raw.shape}")
    values, inverse = np.unique(raw, return_inverse=True)
    if values.size < 2:
        raise DataError(f"dataset {name!r}: needs at least 2 classes, got {values.size}")
    return inverse.astype(np.int64), int(values.size)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], shaped ``(n, 1, 8, 8)``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset("digits", x, np.asarray(bunch.target, dtype=np.int64), 10)


def load_breast_cancer() -> Dataset:
    """scikit-learn's bundled breast-cancer table, ``log1p`` of its (non-negative) features.

    The features span six orders of magnitude; ``log1p`` is a fixed, data-independent
    transform. Standardisation happens later from the public shared set only.
    """
    from sklearn.datasets import load_breast_cancer as sk_bc

    bunch = sk_bc()
    x = np.log1p(np.asarray(bunch.data, dtype=np.float64)).astype(np.float32)
    return Dataset("breast_cancer", x, np.asarray(bunch.target, dtype=np.int64), 2)


def default_cache_dir() -> Path:
    env = os.environ.get("SECFL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "secfl"


def _mnist1d_args(num_samples: int, seed: int) -> dict[str, object]:
    # The generator's documented defaults, with every sample in one pool (we split ourselves).
    return {
        "num_samples": int(num_samples),
        "train_split": 1.0,
        "template_len": 12,
        "padding": [36, 60],
        "scale_coeff": 0.4,
        "max_translation": 48,
        "corr_noise_scale": 0.25,
        "iid_noise_scale": 2e-2,
        "shear_scale": 0.75,
        "shuffle_seq": False,
        "final_seq_length": 40,
        "seed": int(seed),
    }


def load_mnist1d(num_samples: int, *, seed: int = 42, cache_dir: Path | None = None) -> Dataset:
    """MNIST-1D generated offline, shaped ``(n, 1, 40)``; cached by a hash of the arguments."""
    if num_samples < 10:
        raise DataError(f"data.num_samples must be >= 10 for MNIST-1D, got {num_samples}")
    args = _mnist1d_args(num_samples, seed)
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir or default_cache_dir()
    path = folder / f"mnist1d-{digest}.npz"
    if path.exists():
        try:
            with np.load(path) as cached:
                return Dataset("mnist1d", cached["x"], cached["y"], 10)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a torn cache file: regenerate
    x, y = _generate_mnist1d(args)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return Dataset("mnist1d", x, y, 10)


def _generate_mnist1d(args: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global `random` and NumPy generators; leave them as found.
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        out = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.asarray(out["x"], dtype=np.float32).reshape(-1, 1, int(str(args["final_seq_length"])))
    y = np.asarray(out["y"], dtype=np.int64)
    return x, y


def load_npz(path: str | Path) -> Dataset:
    """A NumPy ``.npz`` file with arrays ``x`` (n, ...) and ``y`` (n,)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: .npz must hold arrays 'x' and 'y', found {sorted(f)}")
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read .npz file {path}: {exc}") from exc
    labels, classes = _labels(y, str(path))
    return Dataset(Path(path).stem, _as_features(x, str(path)), labels, classes)


def load_csv(path: str | Path, *, label_column: int = -1) -> Dataset:
    """A numeric CSV (an optional non-numeric header row is skipped); one label column."""
    try:
        table = np.genfromtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read CSV file {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] < 2:
        raise DataError(f"{path}: CSV needs >= 2 numeric columns, got shape {table.shape}")
    if np.isnan(table[0]).all():
        table = table[1:]  # header row
    if np.isnan(table).any():
        row = int(np.argwhere(np.isnan(table))[0][0])
        raise DataError(f"{path}: non-numeric or missing value in data row {row + 1}")
    column = label_column % table.shape[1]
    labels, classes = _labels(table[:, column], str(path))
    features = np.delete(table, column, axis=1)
    return Dataset(Path(path).stem, _as_features(features, str(path)), labels, classes)


_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format; ``.gz`` accepted)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic)")
    dtype = _IDX_TYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX body has {len(raw) - header} bytes, shape {shape} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_idx(images: str | Path, labels: str | Path) -> Dataset:
    """IDX image and label files; ``uint8`` images are scaled to [0, 1]."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.dtype == np.dtype(">u1"):
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[:, None, :, :]
    labels_, classes = _labels(y.astype(np.int64), str(labels))
    return Dataset(Path(images).stem, _as_features(x, str(images)), labels_, classes)


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim < 2:
        raise DataError(f"{name}: features must have shape (n, ...), got {x.shape}")
    try:
        out = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: features are not numeric: {exc}") from exc
    if not np.isfinite(out).all():
        raise DataError(f"{name}: features contain NaN or Inf")
    return out
